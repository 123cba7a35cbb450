#!/usr/bin/env python3
"""A SunSpec device for the tests, built by pysunspec2 from the SunSpec Alliance's model
definitions and served over Modbus TCP by pymodbus (both installed by scripts/install-sunspec).

    device.py --port P [--base 40000] [--models 1,103,160:2,203] [--unit 1] [--fault loop|length]

Every point gets a distinct value from its definition (scale factors -2..1 in turn, strings
named after the point); every fifth non-sf point of models 103 and 203 is left unimplemented
(pysunspec2 writes the type's "not implemented" value). `160:2` is model 160 with 2 modules.
--fault loop: the chain never ends (every model after the last points back); length: the
second model's L runs past the address space. Prints "ready" once it listens.
"""
import argparse
import asyncio
import sys

from sunspec2 import device as ssdev
from sunspec2 import mdef

from pymodbus.datastore import ModbusSequentialDataBlock, ModbusSlaveContext, ModbusServerContext
from pymodbus.server import StartAsyncTcpServer


def fill_group(gdef, counter, model_id, count_of=None):
    values = {}
    for p in gdef.get("points", []):
        name, t = p["name"], p["type"]
        if name in ("ID", "L") or t == "pad":
            continue
        counter[0] += 1
        k = counter[0]
        if t == "sunssf":
            values[name] = [-2, -1, 0, 1][k % 4]
        elif t == "string":
            values[name] = ("%s%d" % (name, model_id))[: 2 * int(p["size"])]
        elif model_id in (103, 203) and k % 5 == 0:
            continue  # left unimplemented
        elif t in ("int16", "int32", "int64"):
            values[name] = -(k * 7 % 900) - 1
        elif t in ("float32",):
            values[name] = k + 0.5
        elif t == "count":
            values[name] = count_of or 0
        else:
            values[name] = k * 13 % 30000 + 1
    return values


def build(models):
    dev = ssdev.Device()
    for spec in models:
        if ":" in spec:
            mid, n = spec.split(":")
            mid, n = int(mid), int(n)
        else:
            mid, n = int(spec), 0
        mdef_ = ssdev.get_model_def(mid)
        g = mdef_[mdef.GROUP]
        counter = [mid]
        values = fill_group(g, counter, mid, count_of=n)
        for sub in g.get("groups", []):
            if sub.get("count") == 0:
                values[sub["name"]] = [fill_group(sub, counter, mid) for _ in range(n)]
        fixed = sum(int(p.get("size", 1)) for p in g["points"])
        rep = 0
        for sub in g.get("groups", []):
            if sub.get("count") == 0:
                rep = sum(int(p.get("size", 1)) for p in sub["points"]) * n
        m = ssdev.Model(model_id=mid, model_len=fixed - 2 + rep)
        m.set_dict(values)
        m.points["ID"].set_value(mid)
        m.points["L"].set_value(fixed - 2 + rep)
        dev.add_model(m)
    return dev


def image(dev, base, fault):
    words = [0x5375, 0x6E53]
    mb = b""
    for mid, ms in sorted(dev.models.items(), key=lambda kv: 0):
        pass
    for m in dev.model_list:
        mb += m.get_mb()
    for i in range(0, len(mb), 2):
        words.append(int.from_bytes(mb[i:i + 2], "big"))
    if fault == "length":
        # Second model header: L far past the address space.
        first_len = words[3]
        words[2 + 2 + first_len + 1] = 0xFFF0
    if fault == "loop":
        # No end marker: unknown models of length 0 to the end of the address space.
        while base + len(words) < 0xFFFE:
            words += [64999, 0]
    else:
        words += [0xFFFF, 0]
    return words


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--base", type=int, default=40000)
    ap.add_argument("--models", default="1,103,160:2,203")
    ap.add_argument("--unit", type=int, default=1)
    ap.add_argument("--fault", choices=["loop", "length"])
    ap.add_argument("--dump", action="store_true", help="print the image and exit")
    a = ap.parse_args()
    dev = build(a.models.split(","))
    words = image(dev, a.base, a.fault)
    if a.dump:
        print(a.base, words)
        return
    # pymodbus' sequential block addresses are 1-based for the request's 0-based address.
    block = ModbusSequentialDataBlock(a.base + 1, words)
    slave = ModbusSlaveContext(hr=block, zero_mode=False)
    ctx = ModbusServerContext(slaves={a.unit: slave}, single=False)

    async def serve():
        print("ready", flush=True)
        await StartAsyncTcpServer(context=ctx, address=("127.0.0.1", a.port))

    asyncio.run(serve())


main()
