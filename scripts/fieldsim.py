#!/usr/bin/env python3
"""A small Modbus device for scripts/soak and scripts/systemd-e2e (Python standard library only,
so it also runs in the minimal Debian root of the systemd check).

    fieldsim.py tcp PORT LOG           Modbus TCP server on 127.0.0.1:PORT
    fieldsim.py rtu PATH LOG [UNIT]    Modbus RTU on the serial device PATH (a socat pty end);
                                       PATH may vanish and come back (a USB adapter unplugged):
                                       the device reopens it.

Holding and input registers 0..99: registers 0-1 hold a u32 (ABCD) read counter: every read
(FC 3 or 4) that starts at address 0 is answered with the counter's next value and logged to
LOG as "<value> <unix time>" (one line, flushed), so the log is the list of readings the device
handed out; a device started again on the same LOG goes on from its last value. Other registers read 0; reads outside 0..99 get exception 2.
SIGUSR1 toggles "mute": requests are read and not answered (a device that stops answering).
"""
import os
import select
import signal
import socket
import struct
import sys
import time

try:
    import termios  # not in Debian's python3-minimal (the systemd-e2e root): socat's `raw` does it
except ImportError:
    termios = None

REGISTERS = 100


class Device:
    def __init__(self, log_path):
        # A device restarted on the same log goes on counting, so every value is handed out once.
        self.counter = 0
        try:
            with open(log_path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0].isdigit():
                        self.counter = int(parts[0])
        except FileNotFoundError:
            pass
        self.mute = False
        self.log = open(log_path, "a", buffering=1)

    def toggle_mute(self, *_):
        self.mute = not self.mute

    def answer(self, unit, pdu):
        """The response PDU for a request PDU, or None (mute, or not a request we serve)."""
        if self.mute or len(pdu) < 1:
            return None
        fc = pdu[0]
        if fc not in (3, 4) or len(pdu) != 5:
            return bytes([fc | 0x80, 1])
        addr, count = struct.unpack(">HH", pdu[1:5])
        if count < 1 or count > 125 or addr + count > REGISTERS:
            return bytes([fc | 0x80, 2])
        regs = [0] * count
        if addr == 0:
            self.counter += 1
            value = self.counter & 0xFFFFFFFF
            regs[0] = value >> 16
            if count > 1:
                regs[1] = value & 0xFFFF
            self.log.write("%d %.6f\n" % (value, time.time()))
        elif addr == 1:
            regs[0] = self.counter & 0xFFFF
        return bytes([fc, 2 * count]) + struct.pack(">%dH" % count, *regs)


def crc16(data):
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def serve_tcp(dev, port):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    conns = {}
    while True:
        try:
            ready, _, _ = select.select([srv] + list(conns), [], [], 1.0)
        except InterruptedError:
            continue
        for s in ready:
            if s is srv:
                c, _ = srv.accept()
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[c] = b""
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                conns.pop(s, None)
                s.close()
                continue
            buf = conns[s] + data
            while len(buf) >= 7:
                tid, proto, length, unit = struct.unpack(">HHHB", buf[:7])
                if length < 2 or length > 254:
                    buf = b""
                    break
                if len(buf) < 6 + length:
                    break
                pdu = buf[7 : 6 + length]
                buf = buf[6 + length :]
                reply = dev.answer(unit, pdu)
                if reply is not None:
                    try:
                        s.sendall(struct.pack(">HHHB", tid, proto, len(reply) + 1, unit) + reply)
                    except OSError:
                        break
            conns[s] = buf


def open_raw(path):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    if termios is None:
        return fd
    attrs = termios.tcgetattr(fd)
    attrs[0] = 0  # iflag
    attrs[1] = 0  # oflag
    attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL
    attrs[3] = 0  # lflag
    attrs[6][termios.VMIN] = 0
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def serve_rtu(dev, path, unit):
    fd = None
    buf = b""
    last = 0.0
    while True:
        if fd is None:
            try:
                fd = open_raw(path)
                buf = b""
            except OSError:
                time.sleep(0.1)
                continue
        try:
            ready, _, _ = select.select([fd], [], [], 0.05)
        except InterruptedError:
            continue
        now = time.monotonic()
        if not ready:
            buf = b""  # a silent gap ends any partial frame
            continue
        try:
            data = os.read(fd, 256)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            # The other end (socat) is gone: the "USB adapter" was unplugged.
            os.close(fd)
            fd = None
            time.sleep(0.1)
            continue
        if now - last > 0.05:
            buf = b""
        last = now
        buf += data
        while len(buf) >= 8:
            frame = buf[:8]
            if crc16(frame[:6]) != struct.unpack("<H", frame[6:8])[0]:
                buf = buf[1:]
                continue
            buf = buf[8:]
            if frame[0] != unit:
                continue
            reply = dev.answer(unit, frame[1:6])
            if reply is None:
                continue
            out = bytes([unit]) + reply
            out += struct.pack("<H", crc16(out))
            try:
                os.write(fd, out)
            except OSError:
                pass


def main(argv):
    if len(argv) < 4 or argv[1] not in ("tcp", "rtu"):
        sys.stderr.write(__doc__)
        return 2
    dev = Device(argv[3])
    signal.signal(signal.SIGUSR1, dev.toggle_mute)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if argv[1] == "tcp":
        serve_tcp(dev, int(argv[2]))
    else:
        serve_rtu(dev, argv[2], int(argv[4]) if len(argv) > 4 else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
