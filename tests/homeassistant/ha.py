#!/usr/bin/env python3
"""Drives a real Home Assistant for fieldbridge's integration tests.

Run with the interpreter of the venv that scripts/install-homeassistant builds:

    ha.py --broker-port PORT [--config-dir DIR] [--keep-config]

It starts Home Assistant as a child process on a free port bound to 127.0.0.1 only, onboards an
owner user, configures the MQTT integration against the broker at 127.0.0.1:PORT (discovery on,
prefix `homeassistant`, default birth message) and waits until Home Assistant is RUNNING and has
sent its birth message (`homeassistant/status` `online`), which it only does once connected,
subscribed and done with the first burst of discovery.

Protocol (request/response only, nothing unsolicited after `ready`):
  stdout: one JSON object per line, each with an "event" field.
  stdin:  one JSON command per line, each answered by exactly one line.

  -> (nothing)                                   <- {"event":"ready","http_port":N,...}
  {"cmd":"entities"}                             <- {"event":"entities","entities":[...],
                                                     "devices":[...]}
  {"cmd":"wait_entity","entity_id":E,
   "state":S|null,"timeout_s":T}                 <- {"event":"entity","entity":{...}}
                                                    | {"event":"timeout",...}
  {"cmd":"wait_gone","entity_id":E,"timeout_s":T} <- {"event":"gone",...} | {"event":"timeout",...}
  {"cmd":"states"}                               <- {"event":"states","states":[...]}
  {"cmd":"service","domain":D,"service":S,
   "data":{...}}                                 <- {"event":"service","status":N,"body":...}
  {"cmd":"quit"}                                 <- {"event":"stopped","code":N}, exit 0
  anything wrong                                 <- {"event":"error","message":"..."}

A failure before `ready` prints {"event":"error",...} and exits 1. stdin EOF and SIGTERM stop
Home Assistant like `quit`. Home Assistant is also told to die with this process (PDEATHSIG), so
a test that kills us with SIGKILL leaves nothing behind.

Only the stdlib and what Home Assistant's venv already holds (aiohttp, paho-mqtt) are used.
"""

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
import paho.mqtt.client as paho

HOST = "127.0.0.1"
CLIENT_ID = "http://127.0.0.1/"  # any URL: onboarding only checks it matches /auth/token's
USERNAME = "fieldbridge"
PASSWORD = "fieldbridge-test-password"
TOKEN_FILE = "fieldbridge-token.json"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)

# Bounds on every wait before `ready`; generous because CI machines are slow (2 cores).
HTTP_UP_TIMEOUT_S = 120.0
RUNNING_TIMEOUT_S = 120.0
BIRTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def emit(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def log(msg):
    sys.stderr.write(f"ha.py: {msg}\n")
    sys.stderr.flush()


class Failure(Exception):
    pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


CONFIGURATION_YAML = """\
# Written by fieldbridge tests/homeassistant/ha.py. No default_config: only what the MQTT
# integration needs, plus the integrations Home Assistant always loads (frontend, backup, ...).
# Location, units and time zone are set here so Home Assistant never guesses them from the
# network, and onboarding needs no core_config step.
homeassistant:
  name: fieldbridge-test
  latitude: 52.52
  longitude: 13.40
  elevation: 34
  unit_system: metric
  currency: EUR
  country: DE
  time_zone: UTC
  internal_url: "http://127.0.0.1:{port}"

http:
  server_host: 127.0.0.1
  server_port: {port}

logger:
  default: warning
  logs:
    homeassistant.bootstrap: info
    homeassistant.setup: info
    homeassistant.components.mqtt: debug
"""


def set_pdeathsig():
    """Runs in the child before exec: die when ha.py dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class BirthWatcher:
    """Subscribes to Home Assistant's status topic before the MQTT entry exists.

    The birth message is not retained, so the subscription has to be in place first.
    """

    def __init__(self, port, topic="homeassistant/status"):
        self.online = threading.Event()
        self.subscribed = threading.Event()
        self.topic = topic
        self.client = paho.Client(client_id=f"fieldbridge-ha-py-{os.getpid()}", clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(HOST, port, keepalive=30)
        except OSError as e:
            raise Failure(f"cannot connect to the MQTT broker at {HOST}:{port}: {e}") from e
        self.client.loop_start()

    def _on_connect(self, client, _userdata, _flags, rc):
        if rc == 0:
            client.subscribe(self.topic, qos=1)

    def _on_message(self, _client, _userdata, msg):
        if msg.payload == b"online":
            self.online.set()

    def close(self):
        try:
            self.client.disconnect()
            self.client.loop_stop()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


class HomeAssistant:
    def __init__(self, args):
        self.args = args
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.proc = None
        self.console = None
        self.session = None
        self.token = None
        self.ws = None
        self.ws_id = 0
        self.birth = None
        self.created_config_dir = False
        self.failed = False  # a failed start keeps a temp config folder, for its log
        if args.config_dir:
            self.config_dir = os.path.abspath(args.config_dir)
            os.makedirs(self.config_dir, exist_ok=True)
        else:
            self.config_dir = tempfile.mkdtemp(prefix="fieldbridge-ha-")
            self.created_config_dir = True
        self.log_path = os.path.join(self.config_dir, "home-assistant.log")
        self.console_path = os.path.join(self.config_dir, "console.log")

    # ---- start-up -------------------------------------------------------------------------

    def write_config(self):
        with open(os.path.join(self.config_dir, "configuration.yaml"), "w") as f:
            f.write(CONFIGURATION_YAML.format(port=self.port))

    def spawn(self):
        cmd = [
            sys.executable,
            "-m",
            "homeassistant",
            "--config",
            self.config_dir,
            "--log-file",
            self.log_path,
            "--log-no-color",
        ]
        if not self.args.allow_pip:
            # Everything is pre-installed by scripts/install-homeassistant: never reach PyPI at
            # start. A missing requirement then fails loudly in the log instead of downloading.
            cmd.append("--skip-pip")
        self.console = open(self.console_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.console,
            stderr=subprocess.STDOUT,
            preexec_fn=set_pdeathsig,
        )
        log(f"started Home Assistant pid {self.proc.pid} on {self.base}, config {self.config_dir}")

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise Failure(f"Home Assistant exited with code {self.proc.returncode}; see {self.log_path}")

    async def wait_for(self, what, timeout_s, probe, interval_s=0.2):
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            result = await probe()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise Failure(f"timed out after {timeout_s:.0f} s waiting for {what}; see {self.log_path}")
            await asyncio.sleep(interval_s)

    async def get_json(self, path, auth=True):
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        async with self.session.get(self.base + path, headers=headers) as r:
            if r.status != 200:
                raise Failure(f"GET {path}: HTTP {r.status}: {(await r.text())[:500]}")
            return await r.json()

    async def post_json(self, path, body):
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.post(self.base + path, json=body, headers=headers) as r:
            text = await r.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            return r.status, data

    async def http_up(self):
        try:
            async with self.session.get(self.base + "/api/onboarding") as r:
                return r.status == 200 and await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def onboard(self, steps):
        done = {s["step"]: s["done"] for s in steps}
        token_file = os.path.join(self.config_dir, TOKEN_FILE)
        if done.get("user"):
            # A reused config folder: onboarding happened before, the token was kept.
            try:
                with open(token_file) as f:
                    self.token = json.load(f)["token"]
                return
            except (OSError, ValueError, KeyError) as e:
                raise Failure(f"config folder already onboarded but {token_file} unusable: {e}")
        async with self.session.post(
            self.base + "/api/onboarding/users",
            json={
                "client_id": CLIENT_ID,
                "name": "fieldbridge",
                "username": USERNAME,
                "password": PASSWORD,
                "language": "en",
            },
        ) as r:
            if r.status != 200:
                raise Failure(f"onboarding user: HTTP {r.status}: {await r.text()}")
            auth_code = (await r.json())["auth_code"]
        async with self.session.post(
            self.base + "/auth/token",
            data={"grant_type": "authorization_code", "code": auth_code, "client_id": CLIENT_ID},
        ) as r:
            if r.status != 200:
                raise Failure(f"auth token: HTTP {r.status}: {await r.text()}")
            self.token = (await r.json())["access_token"]
        # The access token lives 30 minutes; a long-lived one outlasts any test run and survives
        # a reused config folder.
        await self.ws_connect()
        self.token = await self.ws_call(
            {"type": "auth/long_lived_access_token", "client_name": "fieldbridge-tests", "lifespan": 3650}
        )
        with open(token_file, "w") as f:
            json.dump({"token": self.token}, f)
        # The other onboarding steps are left undone on purpose: `core_config` sets up the met.no
        # weather, radio_browser, shopping_list and google_translate integrations, which reach
        # the internet (and need packages we do not install). The API works without them.

    async def ws_connect(self):
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        self.ws = await self.session.ws_connect(self.base + "/api/websocket", max_msg_size=0)
        msg = await asyncio.wait_for(self.ws.receive_json(), 10)
        if msg.get("type") != "auth_required":
            raise Failure(f"websocket: expected auth_required, got {msg}")
        await self.ws.send_json({"type": "auth", "access_token": self.token})
        msg = await asyncio.wait_for(self.ws.receive_json(), 10)
        if msg.get("type") != "auth_ok":
            raise Failure(f"websocket auth failed: {msg}")

    async def ws_call(self, payload, timeout_s=20):
        if self.ws is None or self.ws.closed:
            await self.ws_connect()
        self.ws_id += 1
        await self.ws.send_json({"id": self.ws_id, **payload})
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(f"websocket {payload['type']}: no answer in {timeout_s} s")
            msg = await asyncio.wait_for(self.ws.receive_json(), remaining)
            if msg.get("id") != self.ws_id:
                continue
            if msg.get("type") != "result":
                continue
            if not msg.get("success"):
                raise Failure(f"websocket {payload['type']}: {msg.get('error')}")
            return msg.get("result")

    async def running(self):
        cfg = await self.get_json("/api/config")
        return cfg.get("state") == "RUNNING"

    async def configure_mqtt(self):
        entries = await self.get_json("/api/config/config_entries/entry?domain=mqtt")
        for entry in entries:
            # A reused config folder may point at an earlier run's broker port: start over.
            async with self.session.delete(
                f"{self.base}/api/config/config_entries/entry/{entry['entry_id']}",
                headers={"Authorization": f"Bearer {self.token}"},
            ) as r:
                if r.status != 200:
                    raise Failure(f"deleting old mqtt entry: HTTP {r.status}: {await r.text()}")
        status, flow = await self.post_json(
            "/api/config/config_entries/flow", {"handler": "mqtt", "show_advanced_options": False}
        )
        if status != 200 or flow.get("type") != "form":
            raise Failure(f"mqtt config flow: HTTP {status}: {flow}")
        # Discovery (prefix homeassistant) and the birth message are on by default.
        status, result = await self.post_json(
            f"/api/config/config_entries/flow/{flow['flow_id']}",
            {"broker": HOST, "port": self.args.broker_port},
        )
        if status != 200 or result.get("type") != "create_entry":
            raise Failure(f"mqtt config flow broker step: HTTP {status}: {result}")
        self.entry_id = result["result"]["entry_id"]

    async def start(self):
        t0 = time.monotonic()
        self.write_config()
        self.birth = BirthWatcher(self.args.broker_port)
        if not await asyncio.to_thread(self.birth.subscribed.wait, 10):
            raise Failure(f"could not subscribe to homeassistant/status on 127.0.0.1:{self.args.broker_port}")
        self.spawn()
        self.session = aiohttp.ClientSession(timeout=HTTP_TIMEOUT)
        steps = await self.wait_for("Home Assistant's HTTP server", HTTP_UP_TIMEOUT_S, self.http_up)
        t_http = time.monotonic()
        await self.onboard(steps)
        await self.wait_for("Home Assistant RUNNING", RUNNING_TIMEOUT_S, self.running)
        t_running = time.monotonic()
        await self.configure_mqtt()

        async def birth_seen():
            return self.birth.online.is_set()

        await self.wait_for("the birth message on homeassistant/status", BIRTH_TIMEOUT_S, birth_seen)
        t_ready = time.monotonic()
        self.birth.close()
        emit(
            {
                "event": "ready",
                "http_port": self.port,
                "url": self.base,
                "token": self.token,
                "config_dir": self.config_dir,
                "log": self.log_path,
                "console_log": self.console_path,
                "pid": self.proc.pid,
                "timings_s": {
                    "http": round(t_http - t0, 2),
                    "running": round(t_running - t0, 2),
                    "ready": round(t_ready - t0, 2),
                },
            }
        )

    # ---- commands --------------------------------------------------------------------------

    async def state_of(self, entity_id):
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.get(f"{self.base}/api/states/{entity_id}", headers=headers) as r:
            if r.status == 404:
                return None
            if r.status != 200:
                raise Failure(f"GET /api/states/{entity_id}: HTTP {r.status}")
            return await r.json()

    async def registry_entries(self, entity_ids=None):
        entries = await self.ws_call({"type": "config/entity_registry/list"})
        if entity_ids is not None:
            entries = [e for e in entries if e["entity_id"] in entity_ids]
        if not entries:
            return {}
        # `list` leaves out device_class and units; `get_entries` has the extended form.
        extended = await self.ws_call(
            {"type": "config/entity_registry/get_entries", "entity_ids": [e["entity_id"] for e in entries]}
        )
        return {eid: ext for eid, ext in extended.items() if ext is not None}

    @staticmethod
    def joined(entity_id, reg, state):
        reg = reg or {}
        attrs = (state or {}).get("attributes", {})
        return {
            "entity_id": entity_id,
            "domain": entity_id.split(".", 1)[0],
            "platform": reg.get("platform"),
            "unique_id": reg.get("unique_id"),
            "device_id": reg.get("device_id"),
            "config_entry_id": reg.get("config_entry_id"),
            "name": reg.get("name"),
            "original_name": reg.get("original_name"),
            "has_entity_name": reg.get("has_entity_name"),
            "entity_category": reg.get("entity_category"),
            "disabled_by": reg.get("disabled_by"),
            "original_device_class": reg.get("original_device_class"),
            # What the user sees: a registry override wins over the integration's class.
            "device_class": reg.get("device_class") or reg.get("original_device_class") or attrs.get("device_class"),
            "unit_of_measurement": attrs.get("unit_of_measurement", (reg.get("options") or {}).get("sensor", {}).get("unit_of_measurement")),
            "capabilities": reg.get("capabilities"),
            "state": None if state is None else state.get("state"),
            "attributes": attrs,
            "in_registry": bool(reg),
        }

    async def cmd_entities(self, _cmd):
        reg = await self.registry_entries()
        states = {s["entity_id"]: s for s in await self.get_json("/api/states")}
        devices = await self.ws_call({"type": "config/device_registry/list"})
        entities = [self.joined(eid, reg.get(eid), states.get(eid)) for eid in sorted(set(reg) | set(states))]
        return {
            "event": "entities",
            "entities": entities,
            "devices": [
                {
                    "id": d.get("id"),
                    "name": d.get("name"),
                    "name_by_user": d.get("name_by_user"),
                    "identifiers": d.get("identifiers"),
                    "connections": d.get("connections"),
                    "manufacturer": d.get("manufacturer"),
                    "model": d.get("model"),
                    "sw_version": d.get("sw_version"),
                    "hw_version": d.get("hw_version"),
                    "serial_number": d.get("serial_number"),
                    "configuration_url": d.get("configuration_url"),
                    "via_device_id": d.get("via_device_id"),
                    "config_entries": d.get("config_entries"),
                }
                for d in devices
            ],
        }

    async def cmd_states(self, _cmd):
        return {"event": "states", "states": await self.get_json("/api/states")}

    async def cmd_wait_entity(self, cmd):
        entity_id = cmd["entity_id"]
        want = cmd.get("state")
        want = None if want is None else str(want)
        timeout_s = float(cmd.get("timeout_s", 20))
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            self.check_alive()
            last = await self.state_of(entity_id)
            if last is not None and (want is None or last.get("state") == want):
                reg = await self.registry_entries({entity_id})
                return {"event": "entity", "entity": self.joined(entity_id, reg.get(entity_id), last)}
            if time.monotonic() >= deadline:
                return {
                    "event": "timeout",
                    "entity_id": entity_id,
                    "wanted_state": want,
                    "last_state": None if last is None else last.get("state"),
                    "exists": last is not None,
                }
            await asyncio.sleep(0.1)

    async def cmd_wait_gone(self, cmd):
        entity_id = cmd["entity_id"]
        timeout_s = float(cmd.get("timeout_s", 20))
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            state = await self.state_of(entity_id)
            reg = await self.registry_entries({entity_id})
            if state is None and entity_id not in reg:
                return {"event": "gone", "entity_id": entity_id}
            if time.monotonic() >= deadline:
                return {
                    "event": "timeout",
                    "entity_id": entity_id,
                    "in_states": state is not None,
                    "in_registry": entity_id in reg,
                }
            await asyncio.sleep(0.1)

    async def cmd_service(self, cmd):
        status, body = await self.post_json(
            f"/api/services/{cmd['domain']}/{cmd['service']}", cmd.get("data") or {}
        )
        return {"event": "service", "status": status, "body": body}

    async def handle(self, line):
        try:
            cmd = json.loads(line)
            name = cmd["cmd"]
        except (ValueError, KeyError, TypeError):
            return {"event": "error", "message": f"not a command: {line.strip()[:200]}"}
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            return {"event": "error", "message": f"unknown command {name!r}"}
        try:
            return await handler(cmd)
        except KeyError as e:
            return {"event": "error", "message": f"{name}: missing field {e}"}
        except (Failure, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return {"event": "error", "message": f"{name}: {e or type(e).__name__}"}

    # ---- shutdown --------------------------------------------------------------------------

    async def stop(self):
        code = None
        if self.birth is not None:
            self.birth.close()
        if self.ws is not None and not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), 5)
            except Exception:  # noqa: BLE001
                pass
        if self.session is not None:
            await self.session.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log(f"Home Assistant did not stop in {STOP_TIMEOUT_S:.0f} s, killing it")
                    self.proc.kill()
                    code = await asyncio.to_thread(self.proc.wait, 10)
            else:
                code = self.proc.returncode
        if self.console is not None:
            self.console.close()
        if self.created_config_dir and not self.args.keep_config and not (self.failed and self.proc):
            shutil.rmtree(self.config_dir, ignore_errors=True)  # only the folder mkdtemp made
        elif self.created_config_dir:
            log(f"kept {self.config_dir}")
        return code


def stdin_reader(loop, queue, eof):
    for line in sys.stdin:
        if line.strip():
            loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, None)  # EOF: the test is done or gone
    loop.call_soon_threadsafe(lambda: eof.done() or eof.set_result(True))


async def first(aw, interrupt):
    """Runs `aw` unless `interrupt` (a future) completes first; then None, `aw` cancelled."""
    task = asyncio.ensure_future(aw)
    await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    return None


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-port", type=int, required=True)
    parser.add_argument("--config-dir", help="Home Assistant config folder (default: a new temp folder)")
    parser.add_argument("--keep-config", action="store_true", help="keep the temp config folder at exit")
    parser.add_argument(
        "--allow-pip", action="store_true", help="let Home Assistant pip-install missing requirements (needs network)"
    )
    args = parser.parse_args()

    loop = asyncio.get_running_loop()
    lines = asyncio.Queue()
    terminate = loop.create_future()  # SIGTERM/SIGINT: stop now, even mid-command

    def on_signal():
        if not terminate.done():
            terminate.set_result(True)

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    # Started at once so that commands sent before `ready` wait their turn and EOF is seen.
    eof = loop.create_future()
    threading.Thread(target=stdin_reader, args=(loop, lines, eof), daemon=True).start()

    ha = HomeAssistant(args)
    exit_code = 0
    try:
        # Before `ready`, EOF with no command sent stops us too: nobody is left to use Home
        # Assistant. Commands sent before EOF are answered first (`echo ... | ha.py` works).
        async def nobody_left():
            await eof
            if lines.qsize() <= 1:  # only the EOF marker
                return
            await terminate

        early = asyncio.ensure_future(asyncio.wait({terminate, asyncio.ensure_future(nobody_left())},
                                                   return_when=asyncio.FIRST_COMPLETED))
        await first(ha.start(), early)
        if early.done():
            emit({"event": "error", "message": "stopped before ready", "log": ha.log_path})
            return 1
        early.cancel()
        while True:
            line = await first(lines.get(), terminate)
            if line is None:  # EOF or signal
                break
            try:
                name = json.loads(line).get("cmd")
            except (ValueError, AttributeError):
                name = None
            if name == "quit":
                break
            reply = await first(ha.handle(line), terminate)
            if reply is None:
                break
            emit(reply)
    except (Failure, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        emit({"event": "error", "message": str(e) or type(e).__name__, "log": ha.log_path})
        ha.failed = True
        exit_code = 1
    finally:
        code = await ha.stop()
        emit({"event": "stopped", "code": code})
    return exit_code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
