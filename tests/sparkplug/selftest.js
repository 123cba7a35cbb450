#!/usr/bin/env node
'use strict';
// Self-test of the Sparkplug host checker (host.js), needing no gateway: it plays a fake Edge
// Node with Tahu's encodePayload against a broker the caller started, and checks that host.js
// finds no violation in a correct session and reports each broken one.
//
//   mosquitto -p PORT &   # on 127.0.0.1
//   node tests/sparkplug/selftest.js --port PORT
//
// Exit 0 only when every expectation holds. Every wait is bounded; everything spawned is killed.

const path = require('path');
const { spawn } = require('child_process');
const mqtt = require('mqtt');
const sparkplug = require('sparkplug-payload').get('spBv1.0');
const proto = require('sparkplug-payload/lib/sparkplugPayloadProto');

const Payload = proto.org.eclipse.tahu.protobuf.Payload;
const HOST_JS = path.join(__dirname, 'host.js');
const WAIT_MS = 5000;

function parseArgs(argv) {
    const i = argv.indexOf('--port');
    const port = i >= 0 ? Number(argv[i + 1]) : NaN;
    if (!Number.isInteger(port) || port <= 0) {
        process.stderr.write('usage: selftest.js --port PORT (of an MQTT broker on 127.0.0.1)\n');
        process.exit(2);
    }
    return { port };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves when pred() is true, polling; rejects after ms. */
async function until(what, pred, ms = WAIT_MS) {
    const end = Date.now() + ms;
    for (;;) {
        const v = pred();
        if (v) return v;
        if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
        await sleep(10);
    }
}

// ---------------------------------------------------------------------------------------------
// host.js as a child process.

const children = new Set();

class Host {
    constructor(port, args) {
        this.events = [];
        this.stderr = '';
        this.exited = null;
        this.proc = spawn(process.execPath, [HOST_JS, '--port', String(port), ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
        children.add(this.proc);
        let buf = '';
        this.proc.stdout.setEncoding('utf8');
        this.proc.stdout.on('data', (d) => {
            buf += d;
            let nl;
            while ((nl = buf.indexOf('\n')) >= 0) {
                const line = buf.slice(0, nl);
                buf = buf.slice(nl + 1);
                try {
                    this.events.push(JSON.parse(line));
                } catch (e) {
                    this.events.push({ event: 'unparsable', line });
                }
            }
        });
        this.proc.stderr.on('data', (d) => { this.stderr += d; });
        this.proc.on('exit', (code, signal) => {
            this.exited = { code, signal };
            children.delete(this.proc);
        });
    }

    send(cmd) {
        this.proc.stdin.write(`${JSON.stringify(cmd)}\n`);
    }

    count(pred) {
        return this.events.filter(pred).length;
    }

    async waitEvent(what, pred, ms) {
        return until(what, () => {
            if (this.exited) throw new Error(`host.js exited (${JSON.stringify(this.exited)}) while waiting for ${what}: ${this.stderr}`);
            return this.events.find(pred);
        }, ms);
    }

    async ready() {
        return this.waitEvent('host ready', (e) => e.event === 'ready');
    }

    /** Waits until the host has printed `n` messages of `node` (any type). */
    async seen(node, n) {
        try {
            return await until(`host to see ${n} messages of ${node}`, () => this.count((e) => e.event === 'message' && e.node === node) >= n);
        } catch (e) {
            const seen = this.events.filter((x) => x.event !== 'message' || x.node === node).map((x) => x.type || x.event);
            throw new Error(`${e.message}; host printed ${JSON.stringify(seen)} ${this.stderr}`);
        }
    }

    async command(cmd) {
        const before = this.events.length;
        this.send(cmd);
        return this.waitEvent(`answer to ${cmd.cmd}`, (e) => this.events.indexOf(e) >= before && (e.event === 'sent' || e.event === 'error'));
    }

    async check() {
        const before = this.events.length;
        this.send({ cmd: 'check' });
        return this.waitEvent('check', (e) => e.event === 'check' && this.events.indexOf(e) >= before);
    }

    async quit() {
        this.send({ cmd: 'quit' });
        try {
            await until('host exit', () => this.exited, WAIT_MS);
        } catch (e) {
            this.proc.kill('SIGKILL');
            throw e;
        }
        if (this.exited.code !== 0) throw new Error(`host.js exited with ${JSON.stringify(this.exited)}: ${this.stderr}`);
    }

    kill() {
        if (!this.exited) this.proc.kill('SIGKILL');
    }
}

// ---------------------------------------------------------------------------------------------
// The fake Edge Node.

const T = (name, type, value, extra = {}) => ({ name, type, value, ...extra });

class Edge {
    constructor(port, group, node) {
        this.port = port;
        this.group = group;
        this.node = node;
        this.seq = 0;
        this.bdSeq = 0;
        this.client = null;
        this.commands = [];
    }

    topic(type, device) {
        return `spBv1.0/${this.group}/${type}/${this.node}${device ? `/${device}` : ''}`;
    }

    ndeath(bdSeq) {
        return Buffer.from(sparkplug.encodePayload({ timestamp: Date.now(), metrics: [T('bdSeq', 'Int64', bdSeq)] }));
    }

    /** Connects with the NDEATH will carrying `willBdSeq` (default: this.bdSeq). */
    async connect(willBdSeq = this.bdSeq) {
        this.client = mqtt.connect(`mqtt://127.0.0.1:${this.port}`, {
            protocolVersion: 4,
            clean: true,
            clientId: `selftest-edge-${process.pid}-${Math.random().toString(16).slice(2, 10)}`,
            reconnectPeriod: 0,
            will: { topic: this.topic('NDEATH'), payload: this.ndeath(willBdSeq), qos: 1, retain: false },
        });
        this.client.on('message', (topic, payload) => {
            this.commands.push({ topic, payload: sparkplug.decodePayload(payload) });
        });
        await new Promise((resolve, reject) => {
            const t = setTimeout(() => reject(new Error('edge connect timed out')), WAIT_MS);
            this.client.once('connect', () => { clearTimeout(t); resolve(); });
            this.client.once('error', (e) => { clearTimeout(t); reject(e); });
        });
        await new Promise((resolve, reject) => {
            this.client.subscribe([this.topic('NCMD'), `${this.topic('DCMD')}/+`], { qos: 0 }, (e) => (e ? reject(e) : resolve()));
        });
    }

    /** Publishes raw bytes; options default to QoS 0, not retained. */
    async raw(type, device, bytes, opts = {}) {
        await new Promise((resolve, reject) => {
            this.client.publish(this.topic(type, device), Buffer.from(bytes), { qos: 0, retain: false, ...opts }, (e) => (e ? reject(e) : resolve()));
        });
    }

    /** Tahu-encoded message with the next seq (NBIRTH resets it to 0 unless opts.seq). */
    async pub(type, device, metrics, opts = {}) {
        let seq;
        if ('seq' in opts) seq = opts.seq;
        else if (type === 'NBIRTH') seq = 0;
        else seq = (this.seq + 1) % 256;
        if (seq !== null) this.seq = seq;
        const payload = { timestamp: Date.now(), metrics };
        if (seq !== null) payload.seq = seq;
        await this.raw(type, device, sparkplug.encodePayload(payload), opts.mqtt);
    }

    /**
     * DATA metrics without datatype (the spec's recommendation), which Tahu's encoder cannot
     * write (it throws without `type`): built with Tahu's protobuf module directly.
     */
    async pubBare(type, device, metrics) {
        this.seq = (this.seq + 1) % 256;
        const p = Payload.create({ timestamp: Date.now(), seq: this.seq, metrics: metrics.map((m) => Payload.Metric.create(m)) });
        await this.raw(type, device, Payload.encode(p).finish());
    }

    async nbirth(extra = []) {
        await this.pub('NBIRTH', null, [
            T('bdSeq', 'Int64', this.bdSeq),
            T('Node Control/Rebirth', 'Boolean', false),
            T('uptime', 'UInt32', 1, { alias: 1 }),
            ...extra,
        ]);
    }

    async dbirth(device, metrics) {
        await this.pub('DBIRTH', device, metrics);
    }

    /**
     * Drops the TCP connection without DISCONNECT, so the broker publishes the will. QoS 0
     * publishes whose callback has run may still be unsent: wait for the host to see them first.
     */
    kill() {
        if (this.client) {
            this.client.stream.destroy();
            this.client.end(true);
            this.client = null;
        }
    }

    async close() {
        if (this.client) {
            await new Promise((r) => this.client.end(false, {}, r));
            this.client = null;
        }
    }

    async waitCommand(what, pred) {
        return until(what, () => this.commands.find(pred));
    }
}

const D1 = () => [T('temp', 'Float', 21.5, { alias: 10 }), T('sp', 'UInt16', 3, { alias: 11 }), T('count', 'UInt32', 7, { alias: 12 })];
const D2 = () => [T('big', 'Int64', -5, { alias: 20 }), T('on', 'Boolean', true, { alias: 21 })];

// ---------------------------------------------------------------------------------------------
// Scenarios.

const results = [];

function expect(name, ok, detail) {
    results.push({ name, ok, detail });
    process.stdout.write(`${ok ? 'ok  ' : 'FAIL'} ${name}${ok ? '' : `: ${detail}`}\n`);
}

/** The correct session: zero violations expected. */
async function correctSession(port) {
    const group = `ok${process.pid}`;
    const node = 'n1';
    const host = new Host(port, ['--group', group, '--node', node, '--host-id', `h${process.pid}`]);
    const edge = new Edge(port, group, node);
    try {
        await host.ready();
        const st = await host.command({ cmd: 'state', online: true });
        if (st.event !== 'sent') throw new Error(`state: ${JSON.stringify(st)}`);
        await edge.connect();
        let sent = 0;
        await edge.nbirth(); sent++;
        await edge.dbirth('d1', D1()); sent++;
        await edge.dbirth('d2', D2()); sent++;
        // DDATA by alias, no datatype; UInt32 in int_value (the spec's field) and in long_value
        // (Tahu's).
        await edge.pubBare('DDATA', 'd1', [{ alias: 11, intValue: 1234 }, { alias: 12, intValue: 4000000000 }]); sent++;
        await edge.pubBare('DDATA', 'd1', [{ alias: 12, longValue: 4000000001 }, { alias: 10, floatValue: 1.5 }]); sent++;
        await edge.pubBare('DDATA', 'd2', [{ alias: 20, longValue: '-9007199254740993' }]); sent++;
        await edge.pub('DDATA', 'd1', [{ alias: 11, type: 'UInt16', value: 9 }]); sent++;
        await edge.pub('NDATA', null, [{ alias: 1, type: 'UInt32', value: 2 }]); sent++;
        // Past 255 and round.
        for (let i = 0; i < 300; i++) {
            await edge.pubBare('DDATA', i % 2 ? 'd1' : 'd2', i % 2 ? [{ alias: 11, intValue: i }] : [{ alias: 21, booleanValue: i % 4 === 0 }]);
            sent++;
            if (i % 50 === 49) await host.seen(node, sent);
        }
        await edge.pub('DDEATH', 'd2', []); sent++;
        await edge.dbirth('d2', D2()); sent++;
        await edge.pubBare('DDATA', 'd2', [{ alias: 21, booleanValue: false }]); sent++;
        await host.seen(node, sent);

        // Values read back through the birth's datatype.
        const msgs = host.events.filter((e) => e.event === 'message' && e.node === node);
        const m4 = msgs[3].metrics;
        expect('DATA without datatype is read by the birth datatype (UInt16 by alias)', m4[0].value === 1234 && m4[0].datatype === 'UInt16' && m4[0].birth_name === 'sp' && m4[0].name === null, JSON.stringify(m4[0]));
        expect('UInt32 in int_value is read', m4[1].value === 4000000000 && m4[1].value_field === 'int_value', JSON.stringify(m4[1]));
        const m5 = msgs[4].metrics;
        expect('UInt32 in long_value is read', m5[0].value === 4000000001 && m5[0].value_field === 'long_value', JSON.stringify(m5[0]));
        expect('Float without datatype is read', m5[1].value === 1.5 && m5[1].datatype === 'Float', JSON.stringify(m5[1]));
        const m6 = msgs[5].metrics;
        expect('Int64 beyond 2^53 comes as a decimal string', m6[0].value === '-9007199254740993', JSON.stringify(m6[0]));
        const nb = msgs[0];
        expect('NBIRTH event carries seq 0 and bdSeq 0', nb.type === 'NBIRTH' && nb.seq === 0 && nb.bdSeq === 0 && nb.qos === 0 && nb.retain === false, JSON.stringify(nb));

        // A DCMD by alias, with the birth's datatype.
        const dc = await host.command({ cmd: 'dcmd', device: 'd1', metric: 'sp', value: 7 });
        expect('dcmd is sent by alias', dc.event === 'sent' && dc.alias === 11 && dc.datatype === 'UInt16', JSON.stringify(dc));
        const got = await edge.waitCommand('DCMD', (c) => c.topic.endsWith('/DCMD/n1/d1'));
        const gm = got.payload.metrics[0];
        expect('DCMD arrives with alias 11, UInt16 7, no name', gm.alias && Number(gm.alias) === 11 && gm.type === 'UInt16' && gm.value === 7 && gm.name === undefined, JSON.stringify(gm));
        await host.command({ cmd: 'dcmd', device: 'd2', metric: 'big', value: '-9007199254740993' });
        const got2 = await edge.waitCommand('DCMD d2', (c) => c.topic.endsWith('/DCMD/n1/d2'));
        expect('DCMD Int64 from a string', got2.payload.metrics[0].value.toString() === '-9007199254740993', String(got2.payload.metrics[0].value));
        sent += 2; // our DCMDs come back to the host too

        // A rebirth answered correctly.
        await host.command({ cmd: 'rebirth' });
        const nc = await edge.waitCommand('NCMD', (c) => c.topic.endsWith('/NCMD/n1'));
        const rm = nc.payload.metrics[0];
        expect('NCMD is Node Control/Rebirth = true by name', rm.name === 'Node Control/Rebirth' && rm.value === true && rm.type === 'Boolean' && rm.alias === undefined, JSON.stringify(rm));
        sent += 1;
        await edge.nbirth(); sent++;
        await edge.dbirth('d1', D1()); sent++;
        await edge.dbirth('d2', D2()); sent++;
        await edge.pubBare('DDATA', 'd1', [{ alias: 10, floatValue: 2.5 }]); sent++;
        await host.seen(node, sent);

        // The will, then a new connection with bdSeq + 1.
        edge.kill(); sent++;
        await host.seen(node, sent);
        const nd = host.events.filter((e) => e.event === 'message' && e.type === 'NDEATH').pop();
        expect('NDEATH event carries the will bdSeq, QoS 1', nd && nd.bdSeq === 0 && nd.qos === 1 && nd.retain === false && nd.seq === null, JSON.stringify(nd));
        edge.bdSeq = 1;
        await edge.connect();
        await edge.nbirth(); sent++;
        await edge.dbirth('d1', D1()); sent++;
        await edge.pubBare('DDATA', 'd1', [{ alias: 11, intValue: 1 }]); sent++;
        await host.seen(node, sent);

        const check = await host.check();
        expect('correct session: no violations', check.violations.length === 0, JSON.stringify(check.violations, null, 1));
        const s = check.summary;
        expect('summary counts the wrap, the births and the sessions', s.seq_wraps >= 1 && s.max_seq === 255 && s.sessions === 3 && s.births.NBIRTH === 3 && s.counts.NDEATH === 1 && s.rebirths_completed === 1 && JSON.stringify(s.nbirth_bdseqs) === '[0,0,1]', JSON.stringify(s));
        await host.quit();
        expect('host exits 0 on quit', true, '');
    } finally {
        edge.kill();
        host.kill();
    }
}

/**
 * One broken session: `play(edge, host)` misbehaves; the check must report a violation that
 * matches `pattern`.
 */
async function broken(port, label, pattern, play, hostArgs = []) {
    const group = `bad${process.pid}${label.replace(/[^a-z0-9]/gi, '')}`;
    const node = 'n1';
    const host = new Host(port, ['--group', group, '--node', node, ...hostArgs]);
    const edge = new Edge(port, group, node);
    try {
        await host.ready();
        const n = await play(edge, host, node);
        await host.seen(node, n);
        const check = await host.check();
        const hit = check.violations.find((v) => pattern.test(v));
        expect(`broken: ${label} is reported`, !!hit, `no violation matches ${pattern}: ${JSON.stringify(check.violations)}`);
        if (hit) process.stdout.write(`       ${hit}\n`);
        else process.stdout.write(`       host printed: ${host.events.map((e) => `${e.event}:${e.type || e.cmd || ''}${e.seq !== undefined ? `/${e.seq}` : ''}`).join(' ')}\n`);
        await host.quit();
    } finally {
        edge.kill();
        host.kill();
    }
}

async function brokenSessions(port) {
    await broken(port, 'DATA before birth', /DDATA before NBIRTH/, async (edge) => {
        await edge.connect();
        await edge.pub('DDATA', 'd1', [T('temp', 'Float', 1)], { seq: 0 });
        return 1;
    });
    await broken(port, 'DDATA before DBIRTH', /before its DBIRTH/, async (edge) => {
        await edge.connect();
        await edge.nbirth();
        await edge.pubBare('DDATA', 'd1', [{ alias: 10, floatValue: 1 }]);
        return 2;
    });
    await broken(port, 'seq gap', /seq 3, expected 2/, async (edge) => {
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await edge.pub('DDATA', 'd1', [{ alias: 10, type: 'Float', value: 1 }], { seq: 3 });
        return 3;
    });
    await broken(port, 'NBIRTH seq not 0', /NBIRTH seq is 5/, async (edge) => {
        await edge.connect();
        await edge.pub('NBIRTH', null, [T('bdSeq', 'Int64', 0), T('Node Control/Rebirth', 'Boolean', false)], { seq: 5 });
        return 1;
    });
    await broken(port, 'NBIRTH without rebirth metric', /no "Node Control\/Rebirth"/, async (edge) => {
        await edge.connect();
        await edge.pub('NBIRTH', null, [T('bdSeq', 'Int64', 0)]);
        return 1;
    });
    await broken(port, 'undeclared alias', /alias 99 is not declared/, async (edge) => {
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await edge.pubBare('DDATA', 'd1', [{ alias: 99, intValue: 1 }]);
        return 3;
    });
    await broken(port, 'name in DATA where the birth declared an alias', /sent by name, but the birth declared alias 10/, async (edge) => {
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await edge.pub('DDATA', 'd1', [T('temp', 'Float', 2)]);
        return 3;
    });
    await broken(port, 'alias reused across devices', /alias 10 already declared by the DBIRTH of "d1"/, async (edge) => {
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await edge.dbirth('d2', [T('x', 'Int32', 1, { alias: 10 })]);
        return 3;
    });
    await broken(port, 'NDEATH bdSeq mismatch', /NDEATH bdSeq 5 does not match bdSeq 4/, async (edge, host, node) => {
        edge.bdSeq = 4;
        await edge.connect(5);
        await edge.nbirth();
        await host.seen(node, 1); // mqtt.js may not have flushed a QoS 0 publish when it calls back
        edge.kill();
        return 2;
    });
    await broken(port, 'bdSeq going backwards', /bdSeq 2 goes backwards from 3/, async (edge, host, node) => {
        edge.bdSeq = 3;
        await edge.connect();
        await edge.nbirth();
        await host.seen(node, 1);
        edge.kill();
        await host.seen(node, 2);
        edge.bdSeq = 2;
        await edge.connect();
        await edge.nbirth();
        return 3;
    });
    await broken(port, 'DATA after rebirth request before births', /DDATA after the rebirth request and before the new NBIRTH/, async (edge, host, node) => {
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await host.seen(node, 2); // else the first NBIRTH may itself come after the NCMD
        await host.command({ cmd: 'rebirth' });
        await edge.waitCommand('NCMD', (c) => c.topic.endsWith('/NCMD/n1'));
        await edge.pubBare('DDATA', 'd1', [{ alias: 10, floatValue: 1 }]);
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        return 6; // NBIRTH, DBIRTH, NCMD echo, DDATA, NBIRTH, DBIRTH
    });
    await broken(port, 'DATA after rebirth before every DBIRTH', /before the DBIRTH of d2/, async (edge, host, node) => {
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await edge.dbirth('d2', D2());
        await host.seen(node, 3);
        await host.command({ cmd: 'rebirth' });
        await edge.waitCommand('NCMD', (c) => c.topic.endsWith('/NCMD/n1'));
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await edge.pubBare('DDATA', 'd1', [{ alias: 10, floatValue: 1 }]);
        await edge.dbirth('d2', D2());
        return 8;
    });
    await broken(port, 'NBIRTH before STATE online', /NBIRTH before the host published STATE online/, async (edge) => {
        await edge.connect();
        await edge.nbirth();
        return 1;
    }, ['--host-id', `hb${process.pid}`]);
    await broken(port, 'DATA while STATE offline', /DDATA \d+ ms after the host published STATE offline/, async (edge, host) => {
        await host.command({ cmd: 'state', online: true });
        await edge.connect();
        await edge.nbirth();
        await edge.dbirth('d1', D1());
        await host.command({ cmd: 'state', online: false });
        await sleep(700);
        await edge.pubBare('DDATA', 'd1', [{ alias: 10, floatValue: 1 }]);
        return 3;
    }, ['--host-id', `hc${process.pid}`]);
    await broken(port, 'retained QoS 1 NBIRTH', /NBIRTH is retained/, async (edge) => {
        await edge.connect();
        await edge.pub('NBIRTH', null, [T('bdSeq', 'Int64', 0), T('Node Control/Rebirth', 'Boolean', false)], { mqtt: { qos: 1, retain: true } });
        return 1;
    });
}

async function main() {
    const { port } = parseArgs(process.argv.slice(2));
    const started = Date.now();
    const overall = setTimeout(() => {
        process.stdout.write('FAIL selftest: overall timeout (120 s)\n');
        for (const c of children) c.kill('SIGKILL');
        process.exit(1);
    }, 120000);
    try {
        await correctSession(port);
    } catch (e) {
        expect('correct session runs to the end', false, e.stack || String(e));
    }
    try {
        await brokenSessions(port);
    } catch (e) {
        expect('broken sessions run to the end', false, e.stack || String(e));
    }
    clearTimeout(overall);
    for (const c of children) c.kill('SIGKILL');
    const failed = results.filter((r) => !r.ok).length;
    process.stdout.write(`selftest: ${results.length - failed} passed, ${failed} failed (${((Date.now() - started) / 1000).toFixed(1)} s)\n`);
    process.exit(failed ? 1 : 0);
}

main();
