#!/usr/bin/env bash
# Runs a cross-built binary under qemu-user: --version, `check` on the example configs, and a
# short `run` against a mosquitto on loopback with a tiny Modbus TCP device (serial ioctls
# are not emulated by qemu-user; TCP is). Exit status 0 when all pass.
#
#   cross/qemu-smoke.sh TARGET [BINARY]
#
# Needs qemu-user, mosquitto, python3 and the target's libc (libc6-*-cross provides
# /usr/aarch64-linux-gnu and /usr/arm-linux-gnueabihf).
set -euo pipefail
target=${1:?usage: cross/qemu-smoke.sh TARGET [BINARY]}
cd "$(dirname "$0")/.."
bin=${2:-${CARGO_TARGET_DIR:-target}/$target/release/fieldbridge}
case "$target" in
    aarch64-*-gnu) run=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
    arm*-gnueabihf) run=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
    aarch64-*-musl) run=(qemu-aarch64) ;;
    *) run=() ;;
esac
fb() { "${run[@]}" "$bin" "$@"; }

echo "== --version"; fb --version
for c in config/examples/*.yaml config/fieldbridge.yaml; do
    echo "== check $c"; fb check --config "$c" | head -1
done

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(free_port); modbus=$(free_port)

printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mqtt" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 & pids+=($!)

# A Modbus TCP device: answers FC3 (read holding registers) with register n = 100 + n.
python3 - "$modbus" > "$work/device.log" 2>&1 <<'PY' & pids+=($!)
import socket, struct, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen()
def serve(c):
    while True:
        h = c.recv(7)
        if len(h) < 7: return
        tid, _, length, unit = struct.unpack(">HHHB", h)
        pdu = c.recv(length - 1)
        if pdu[0] == 3:
            start, count = struct.unpack(">HH", pdu[1:5])
            body = bytes([3, 2 * count]) + b"".join(struct.pack(">H", 100 + start + i) for i in range(count))
        else:
            body = bytes([pdu[0] | 0x80, 1])
        c.sendall(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY

cat > "$work/fieldbridge.yaml" <<YAML
gateway: { id: qemu, prefix: q }
mqtt: { url: "mqtt://127.0.0.1:$mqtt" }
store: { path: "$work/outbox.db" }
buses:
  - { name: b, type: tcp, host: 127.0.0.1, port: $modbus }
devices:
  - name: d
    bus: b
    interval: 200ms
    points:
      - { name: v, address: 0 }
YAML
fb check --config "$work/fieldbridge.yaml" > /dev/null 2>&1 || sed -i '/^store:/d' "$work/fieldbridge.yaml"
sleep 0.5
echo "== run (5 s)"
# exec: $! must be the gateway (or qemu, which forwards SIGTERM to it), not a subshell.
(RUST_LOG=info exec "${run[@]}" "$bin" run --config "$work/fieldbridge.yaml" > "$work/run.log" 2>&1) &
gw=$!; pids+=("$gw")
sleep 5
kill -TERM "$gw"; wait "$gw" || { echo "run exited with $?"; cat "$work/run.log"; exit 1; }
grep -E "MQTT connected|device online|link summary" "$work/run.log"
grep -q "device online" "$work/run.log" && grep -qE "link summary.*delivered=[1-9]" "$work/run.log" \
    || { echo "FAILED"; cat "$work/run.log"; exit 1; }
echo "OK: $target"
