#!/usr/bin/env python3
"""pysunspec2's own client reading a SunSpec device over Modbus TCP: prints one JSON object,
point name -> computed value (scale factor applied; null when not implemented), named as
fieldbridge names them: MODEL_POINT, MODEL_GROUPk_POINT for repeating groups (k from 1),
MODEL_n_... for the n-th model of the same name (n from 2).

    client.py --port P [--unit 1]
"""
import argparse
import json

from sunspec2.modbus.client import SunSpecModbusClientDeviceTCP


def points(prefix, group, out):
    for name, p in group.points.items():
        if name in ("ID", "L") or p.pdef.get("type") in ("pad", "sunssf"):
            continue
        v = p.cvalue
        if isinstance(v, float) and v != v:
            v = None
        out[prefix + name] = v
    for gname, g in group.groups.items():
        if isinstance(g, list):
            for k, sub in enumerate(g, start=1):
                points("%s%s%d_" % (prefix, gname, k), sub, out)
        else:
            points("%s%s_" % (prefix, gname), g, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--unit", type=int, default=1)
    a = ap.parse_args()
    d = SunSpecModbusClientDeviceTCP(slave_id=a.unit, ipaddr="127.0.0.1", ipport=a.port, timeout=5)
    d.scan()
    out = {}
    seen = {}
    for m in d.model_list:
        name = m.gname
        seen[name] = seen.get(name, 0) + 1
        prefix = name if seen[name] == 1 else "%s_%d" % (name, seen[name])
        points(prefix + "_", m, out)
    d.close()
    print(json.dumps(out, sort_keys=True))


main()
