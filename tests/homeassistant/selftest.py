#!/usr/bin/env python3
"""Self-test of the Home Assistant harness (ha.py), without the gateway.

Run with the venv's interpreter that scripts/install-homeassistant builds:

    selftest.py [--broker-port PORT] [--keep]

Without --broker-port it starts its own mosquitto on a free 127.0.0.1 port (killed by PID at the
end). It then starts ha.py, publishes retained discovery configs for a sensor and a number the
way the gateway will, and checks through ha.py what Home Assistant made of them: domain, unit,
device class, state, the device; that number.set_value reaches the command topic; and that an
empty retained config removes the entity. Exit 0 only if every check holds.
"""

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as paho

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
PREFIX = "homeassistant"
AVAIL = "fb_test/status"
DEVICE = {"identifiers": ["fb_test"], "name": "FB Test", "manufacturer": "fieldbridge", "model": "selftest"}
SENSOR_CONFIG_TOPIC = f"{PREFIX}/sensor/fb_test/volts/config"
SENSOR = {
    "name": "Volts",
    "object_id": "fb_test_volts",
    "unique_id": "fb_test_volts",
    "state_topic": "fb_test/volts/state",
    "unit_of_measurement": "V",
    "device_class": "voltage",
    "state_class": "measurement",
    "availability_topic": AVAIL,
    "device": DEVICE,
}
NUMBER_CONFIG_TOPIC = f"{PREFIX}/number/fb_test/setpoint/config"
NUMBER = {
    "name": "Setpoint",
    "object_id": "fb_test_setpoint",
    "unique_id": "fb_test_setpoint",
    "state_topic": "fb_test/setpoint/state",
    "command_topic": "fb_test/setpoint/set",
    "min": 0,
    "max": 100,
    "step": 1,
    "availability_topic": AVAIL,
    "device": DEVICE,
}


def say(msg):
    print(f"selftest: {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Harness:
    """ha.py as a child: one JSON command per line in, one JSON event per line out."""

    def __init__(self, broker_port, config_dir):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "ha.py"), "--broker-port", str(broker_port), "--config-dir", config_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def next_event(self, timeout_s):
        try:
            ev = self.events.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"ha.py said nothing in {timeout_s} s")
        if ev is None:
            raise AssertionError(f"ha.py exited (code {self.proc.wait()})")
        return ev

    def call(self, cmd, timeout_s=60):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.next_event(timeout_s)

    def quit(self, timeout_s=40):
        if self.proc.poll() is not None:
            return self.proc.returncode
        try:
            self.proc.stdin.write('{"cmd":"quit"}\n')
            self.proc.stdin.flush()
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, what, ok, detail=""):
        if ok:
            self.passed += 1
            say(f"ok   {what}")
        else:
            self.failed += 1
            say(f"FAIL {what} {detail}")
        return ok


def run(args, work):
    checks = Checks()
    mosquitto = None
    ha = None
    client = None
    try:
        broker_port = args.broker_port
        if broker_port is None:
            broker_port = free_port()
            conf = os.path.join(work, "mosquitto.conf")
            with open(conf, "w") as f:
                f.write(f"listener {broker_port} {HOST}\nallow_anonymous true\npersistence false\n")
            exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            mosquitto = subprocess.Popen(
                [exe, "-c", conf], stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "mosquitto.log"), "wb")
            )
            if not wait_port(broker_port, 10):
                raise AssertionError(f"mosquitto did not listen on {broker_port}")
            say(f"mosquitto pid {mosquitto.pid} on {HOST}:{broker_port}")

        t0 = time.monotonic()
        ha = Harness(broker_port, os.path.join(work, "ha-config"))
        ready = ha.next_event(300)
        if not checks.check("ha.py ready", ready.get("event") == "ready", json.dumps(ready)):
            return checks
        say(f"Home Assistant ready after {time.monotonic() - t0:.1f} s: http_port {ready['http_port']}, "
            f"timings {ready['timings_s']}, log {ready['log']}")

        commands = queue.Queue()
        client = paho.Client(client_id="fieldbridge-selftest", clean_session=True)
        subscribed = threading.Event()
        client.on_connect = lambda c, *_: c.subscribe(NUMBER["command_topic"], qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda _c, _u, m: commands.put(m.payload)
        client.connect(HOST, broker_port, keepalive=30)
        client.loop_start()
        if not subscribed.wait(10):
            raise AssertionError("could not subscribe to the command topic")

        def publish(topic, payload, retain=True):
            info = client.publish(topic, payload, qos=1, retain=retain)
            info.wait_for_publish(10)

        publish(SENSOR_CONFIG_TOPIC, json.dumps(SENSOR))
        publish(NUMBER_CONFIG_TOPIC, json.dumps(NUMBER))
        publish(AVAIL, "online")
        publish(SENSOR["state_topic"], "230.1")
        publish(NUMBER["state_topic"], "5")

        ev = ha.call({"cmd": "wait_entity", "entity_id": "sensor.fb_test_volts", "state": "230.1", "timeout_s": 30})
        if checks.check("sensor.fb_test_volts reaches state 230.1", ev["event"] == "entity", json.dumps(ev)):
            e = ev["entity"]
            checks.check("sensor domain/platform", (e["domain"], e["platform"]) == ("sensor", "mqtt"), json.dumps(e))
            checks.check("sensor unique_id", e["unique_id"] == "fb_test_volts", e["unique_id"])
            checks.check("sensor unit V", e["unit_of_measurement"] == "V", e["unit_of_measurement"])
            checks.check("sensor device_class voltage", e["device_class"] == "voltage", e["device_class"])
            checks.check("sensor has a device", e["device_id"] is not None)

        ev = ha.call({"cmd": "wait_entity", "entity_id": "number.fb_test_setpoint", "state": "5", "timeout_s": 30})
        checks.check("number.fb_test_setpoint reaches state 5", ev["event"] == "entity", json.dumps(ev))

        ev = ha.call({"cmd": "entities"})
        if checks.check("entities answers", ev["event"] == "entities", json.dumps(ev)[:500]):
            ours = [d for d in ev["devices"] if ["mqtt", "fb_test"] in d["identifiers"]]
            checks.check("one device with identifier fb_test", len(ours) == 1, json.dumps(ev["devices"]))
            if ours:
                d = ours[0]
                checks.check(
                    "device name/manufacturer/model",
                    (d["name"], d["manufacturer"], d["model"]) == ("FB Test", "fieldbridge", "selftest"),
                    json.dumps(d),
                )
                mine = {e["entity_id"] for e in ev["entities"] if e["device_id"] == d["id"]}
                checks.check(
                    "both entities on that device",
                    mine == {"sensor.fb_test_volts", "number.fb_test_setpoint"},
                    sorted(mine),
                )

        ev = ha.call({"cmd": "service", "domain": "number", "service": "set_value",
                      "data": {"entity_id": "number.fb_test_setpoint", "value": 7}})
        checks.check("number.set_value answers 200", ev["event"] == "service" and ev["status"] == 200, json.dumps(ev))
        try:
            payload = commands.get(timeout=10)
        except queue.Empty:
            payload = None
        checks.check("command topic receives 7", payload == b"7", repr(payload))

        publish(SENSOR_CONFIG_TOPIC, b"")
        publish(NUMBER_CONFIG_TOPIC, b"")
        for entity_id in ("sensor.fb_test_volts", "number.fb_test_setpoint"):
            ev = ha.call({"cmd": "wait_gone", "entity_id": entity_id, "timeout_s": 20})
            checks.check(f"{entity_id} gone after an empty config", ev["event"] == "gone", json.dumps(ev))
        ev = ha.call({"cmd": "entities"})
        left = [d for d in ev.get("devices", []) if ["mqtt", "fb_test"] in d["identifiers"]]
        checks.check("device gone with its last entity", not left, json.dumps(left))

        ev = ha.call({"cmd": "nonsense"})
        checks.check("unknown command answers an error", ev["event"] == "error", json.dumps(ev))

        for topic in (AVAIL, SENSOR["state_topic"], NUMBER["state_topic"]):
            publish(topic, b"")
        t = time.monotonic()
        code = ha.quit()
        checks.check("ha.py quits with 0", code == 0, f"code {code}")
        stopped = None
        while True:
            try:
                ev = ha.events.get_nowait()
            except queue.Empty:
                break
            if ev and ev.get("event") == "stopped":
                stopped = ev
        checks.check("stopped event printed", stopped is not None)
        say(f"stopped in {time.monotonic() - t:.1f} s: {stopped}")
    except AssertionError as e:
        checks.check("harness", False, str(e))
    finally:
        if client is not None:
            client.loop_stop()
            client.disconnect()
        if ha is not None and ha.quit() not in (0, None):
            pass
        if ha is not None and checks.failed:
            say(f"Home Assistant log: {os.path.join(work, 'ha-config', 'home-assistant.log')}")
        if mosquitto is not None:
            mosquitto.send_signal(signal.SIGTERM)
            try:
                mosquitto.wait(10)
            except subprocess.TimeoutExpired:
                mosquitto.kill()
                mosquitto.wait()
    return checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-port", type=int, help="use this broker instead of starting mosquitto")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (config, logs)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="fieldbridge-ha-selftest-")
    say(f"work folder {work}")
    checks = run(args, work)
    if args.keep or checks.failed:
        say(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)  # only the folder made above
    print(f"selftest: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 0 if checks.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
