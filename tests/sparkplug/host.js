#!/usr/bin/env node
'use strict';
// Independent Sparkplug B 3.0 host application for fieldbridge's integration tests.
//
// It decodes with Eclipse Tahu's JavaScript payload library (sparkplug-payload), not with any
// of fieldbridge's Rust code, so that the gateway is judged by a second implementation.
//
//   node tests/sparkplug/host.js --port PORT --group GROUP --node NODE [--host-id HOST]
//        [--data-qos 0|1] [--offline-grace-ms 500] [--rebirth-grace-ms 0]
//
// stdout: one JSON object per line (events: ready, message, sent, error, check, exit).
// stdin:  one JSON command per line (rebirth, dcmd, state, check, quit). EOF = quit.
// stderr: diagnostics for humans only.
//
// Layout: `Checker` is pure (events in, violations out, no I/O) so that it can be driven
// without a broker; `decodeMessage` turns raw bytes into the printed shape; `main` is the
// MQTT and stdio shell around them.

const sparkplug = require('sparkplug-payload').get('spBv1.0');
// Tahu's generated protobufjs module (pbjs static-module of sparkplug_b.proto). The package
// does not re-export it from index.js, but ships it as lib/sparkplugPayloadProto.js.
const proto = require('sparkplug-payload/lib/sparkplugPayloadProto');
const Long = require('long');

const Payload = proto.org.eclipse.tahu.protobuf.Payload;
const Metric = Payload.Metric;

const NAMESPACE = 'spBv1.0';
const NODE_TYPES = new Set(['NBIRTH', 'NDEATH', 'NDATA', 'NCMD']);
const DEVICE_TYPES = new Set(['DBIRTH', 'DDEATH', 'DDATA', 'DCMD']);
// Messages that carry `seq` in one session (Sparkplug 3.0 §6.4.x: NDEATH has none; commands
// come from hosts and are outside the node's sequence).
const SEQ_TYPES = new Set(['NBIRTH', 'DBIRTH', 'NDATA', 'DDATA', 'DDEATH']);
const BIRTH_OR_DATA = new Set(['NBIRTH', 'DBIRTH', 'NDATA', 'DDATA']);

const DATATYPES = {
    1: 'Int8', 2: 'Int16', 3: 'Int32', 4: 'Int64', 5: 'UInt8', 6: 'UInt16', 7: 'UInt32',
    8: 'UInt64', 9: 'Float', 10: 'Double', 11: 'Boolean', 12: 'String', 13: 'DateTime',
    14: 'Text', 15: 'UUID', 16: 'DataSet', 17: 'Bytes', 18: 'File', 19: 'Template',
    20: 'PropertySet', 21: 'PropertySetList',
    22: 'Int8Array', 23: 'Int16Array', 24: 'Int32Array', 25: 'Int64Array', 26: 'UInt8Array',
    27: 'UInt16Array', 28: 'UInt32Array', 29: 'UInt64Array', 30: 'FloatArray',
    31: 'DoubleArray', 32: 'BooleanArray', 33: 'StringArray', 34: 'DateTimeArray',
};
const DATATYPE_CODES = Object.fromEntries(Object.entries(DATATYPES).map(([k, v]) => [v, Number(k)]));
const VALUE_FIELDS = ['intValue', 'longValue', 'floatValue', 'doubleValue', 'booleanValue',
    'stringValue', 'bytesValue', 'datasetValue', 'templateValue', 'extensionValue'];
const VALUE_FIELD_NAMES = {
    intValue: 'int_value', longValue: 'long_value', floatValue: 'float_value',
    doubleValue: 'double_value', booleanValue: 'boolean_value', stringValue: 'string_value',
    bytesValue: 'bytes_value', datasetValue: 'dataset_value', templateValue: 'template_value',
    extensionValue: 'extension_value',
};

// ---------------------------------------------------------------------------------------------
// Plain values: what JSON can carry.

/** Long → number when it is a safe integer, else its decimal string; recursively. */
function plain(v) {
    if (v === null || v === undefined) return null;
    if (Long.isLong(v)) {
        const big = BigInt(v.toString());
        return (big <= BigInt(Number.MAX_SAFE_INTEGER) && big >= BigInt(Number.MIN_SAFE_INTEGER))
            ? Number(big) : big.toString();
    }
    if (typeof v === 'bigint') return plain(Long.fromString(v.toString()));
    if (v instanceof Uint8Array) return Buffer.from(v).toString('base64');
    if (Array.isArray(v)) return v.map(plain);
    if (typeof v === 'number' && !Number.isFinite(v)) return String(v); // NaN, ±Infinity
    if (typeof v === 'object') {
        const out = {};
        for (const [k, x] of Object.entries(v)) out[k] = plain(x);
        return out;
    }
    return v;
}

function own(obj, field) {
    return obj !== null && obj !== undefined && Object.prototype.hasOwnProperty.call(obj, field);
}

function ownNumber(obj, field) {
    return own(obj, field) ? plain(obj[field]) : null;
}

// ---------------------------------------------------------------------------------------------
// Topics and payloads.

/** spBv1.0/{group}/{type}/{node}[/{device}] → parts, or null if it is not such a topic. */
function parseTopic(topic) {
    const parts = topic.split('/');
    if (parts[0] !== NAMESPACE || parts.length < 4 || parts.length > 5) return null;
    const [, group, type, node, device] = parts;
    if (NODE_TYPES.has(type) && parts.length === 4) return { group, type, node, device: null };
    if (DEVICE_TYPES.has(type) && parts.length === 5) return { group, type, node, device };
    return null;
}

/**
 * Reads a metric's value by `code`, the datatype of the metric itself or, when the metric was
 * sent without one (Sparkplug 3.0 recommends leaving it out of DATA), the datatype declared in
 * the birth. Tahu's decodePayload only uses the metric's own datatype, so here the raw metric is
 * given the datatype and handed back to Tahu's decoder, keeping Tahu's reading of every type.
 * UInt32 is read from whichever of int_value / long_value carries it: Tahu writes long_value,
 * the spec names int_value, and Tahu's decoder reads only long_value.
 */
function readValue(code, raw) {
    if (own(raw, 'isNull') && raw.isNull === true) return null;
    if (code === 7) {
        if (own(raw, 'intValue')) return raw.intValue >>> 0;
        if (own(raw, 'longValue')) return plain(raw.longValue);
        return null;
    }
    if (!code) return null;
    const copy = Metric.create();
    for (const f of VALUE_FIELDS) if (own(raw, f)) copy[f] = raw[f];
    copy.datatype = code;
    const decoded = sparkplug.decodePayload(Payload.encode(Payload.create({ metrics: [copy] })).finish());
    return plain(decoded.metrics[0].value);
}

function valueField(raw) {
    for (const f of VALUE_FIELDS) if (own(raw, f)) return VALUE_FIELD_NAMES[f];
    return null;
}

/**
 * Decodes one Sparkplug payload. `lookup(metric)` returns the birth's declaration
 * ({name, alias, datatype}) of a DATA metric, or null. Tahu's decodePayload is tried first; when
 * it throws (it does on DataSets with Int32 columns, for one) the raw protobuf is used alone and
 * the error is reported as `tahu_error`.
 */
function decodeMessage(bytes, lookup) {
    const raw = Payload.decode(bytes); // throws on bytes that are not a Sparkplug payload
    let tahu = null;
    let tahuError = null;
    try {
        tahu = sparkplug.decodePayload(bytes);
    } catch (e) {
        tahuError = String(e && e.message || e);
    }
    const metrics = (raw.metrics || []).map((rm, i) => {
        const tm = tahu && tahu.metrics ? tahu.metrics[i] : null;
        const sentType = own(rm, 'datatype') ? rm.datatype : null;
        const decl = lookup ? lookup(rm) : null;
        const code = sentType !== null ? sentType : (decl ? decl.datatype : null);
        let value;
        if (own(rm, 'isNull') && rm.isNull === true) value = null;
        else if (sentType !== null && sentType !== 7 && tm) value = plain(tm.value);
        else {
            try {
                value = readValue(code, rm);
            } catch (e) {
                value = null;
                tahuError = tahuError || String(e && e.message || e);
            }
        }
        let properties = null;
        if (own(rm, 'properties') && rm.properties) {
            properties = tm && tm.properties ? plain(tm.properties) : plain(Payload.PropertySet.toObject(rm.properties));
        }
        return {
            name: own(rm, 'name') ? rm.name : null,
            alias: ownNumber(rm, 'alias'),
            datatype: code ? (DATATYPES[code] || `unknown(${code})`) : null,
            datatype_sent: sentType !== null,
            birth_name: decl ? decl.name : null,
            value,
            value_field: valueField(rm),
            is_null: own(rm, 'isNull') && rm.isNull === true,
            is_historical: own(rm, 'isHistorical') && rm.isHistorical === true,
            is_transient: own(rm, 'isTransient') && rm.isTransient === true,
            timestamp: ownNumber(rm, 'timestamp'),
            properties,
        };
    });
    return {
        seq: ownNumber(raw, 'seq'),
        timestamp: ownNumber(raw, 'timestamp'),
        metrics,
        tahu_error: tahuError,
    };
}

// ---------------------------------------------------------------------------------------------
// The checker: pure state, events in, violations out.

/** A birth's declarations: by name and by alias. */
function declarations(metrics) {
    const byName = new Map();
    const byAlias = new Map();
    for (const m of metrics) {
        const d = { name: m.name, alias: m.alias, datatype: m.datatype ? DATATYPE_CODES[m.datatype] : null };
        if (m.name !== null) byName.set(m.name, d);
        if (m.alias !== null) byAlias.set(String(m.alias), d);
    }
    return { byName, byAlias };
}

function metricLabel(m) {
    if (m.alias !== null && m.name !== null) return `metric ${JSON.stringify(m.name)} (alias ${m.alias})`;
    if (m.alias !== null) return `alias ${m.alias}`;
    return `metric ${JSON.stringify(m.name)}`;
}

class Checker {
    constructor({ node, hostId = null, dataQos = 0, offlineGraceMs = 500, rebirthGraceMs = 0 }) {
        this.node = node;
        this.hostId = hostId;
        this.dataQos = dataQos;
        this.offlineGraceMs = offlineGraceMs;
        this.rebirthGraceMs = rebirthGraceMs;
        this.violations = [];
        this.index = -1;
        this.counts = {};
        this.session = null; // { number, bdSeq, lastSeq, node: decls, devices: Map }
        this.sessions = 0;
        this.maxSeq = null;
        this.seqWraps = 0;
        this.nbirthBdSeqs = [];
        this.lastBdSeq = null;
        this.endedSinceLastBirth = true; // an NDEATH (or no session yet) since the last NBIRTH
        this.lastBirthOfDevice = new Map(); // device → decls of its last DBIRTH, across sessions
        this.rebirth = null; // { requestedAt, armedAt, alive: Set, nbirth, dbirths: Set }
        this.rebirthsCompleted = 0;
        this.stateOnlineAt = null; // ms of the last `state online` command while online
        this.stateOfflineAt = null; // ms of the last `state offline` command while offline
    }

    violate(ctx, text) {
        this.violations.push(`#${ctx.index} ${ctx.topic}: ${text}`);
    }

    // --- commands the host sent -------------------------------------------------------------

    rebirthRequested(nowMs) {
        this.rebirth = { requestedAt: nowMs, armedAt: null, alive: new Set(), nbirth: false, dbirths: new Set() };
    }

    /**
     * The rebirth request counts from when the broker passed it on: our own NCMD coming back
     * (we subscribe to the group) marks that point, since the broker delivers in order. The
     * devices to be reborn are those alive then. Should the NCMD never come back, a second
     * after sending it.
     */
    armRebirth(atMs) {
        const r = this.rebirth;
        if (!r || r.armedAt !== null) return;
        r.armedAt = atMs;
        if (this.session) for (const [d, s] of this.session.devices) if (s.alive) r.alive.add(d);
    }

    stateSent(online, nowMs) {
        if (online) {
            this.stateOnlineAt = nowMs;
            this.stateOfflineAt = null;
        } else {
            this.stateOfflineAt = nowMs;
        }
    }

    /** Looks a DATA metric up in the birth it belongs to (the printed `birth_name`/datatype). */
    lookup(parsed) {
        if (!parsed || parsed.node !== this.node || !this.session) return () => null;
        let decls = null;
        if (parsed.type === 'NDATA') decls = this.session.node;
        else if (parsed.type === 'DDATA' || parsed.type === 'DDEATH') {
            const dev = this.session.devices.get(parsed.device);
            decls = dev ? dev.decls : null;
        }
        if (!decls) return () => null;
        return (rm) => {
            if (own(rm, 'alias')) return decls.byAlias.get(String(plain(rm.alias))) || null;
            if (own(rm, 'name')) return decls.byName.get(rm.name) || null;
            return null;
        };
    }

    // --- messages received ------------------------------------------------------------------

    /** msg = { index, topic, parsed, qos, retain, seq, timestamp, bdSeq, metrics, atMs } */
    observe(msg) {
        this.index = msg.index;
        const p = msg.parsed;
        if (!p) return;
        if (this.rebirth && this.rebirth.armedAt === null && msg.atMs >= this.rebirth.requestedAt + 1000) this.armRebirth(msg.atMs);
        if ((p.type === 'NCMD' && p.node === this.node) || (p.type === 'DCMD' && p.node === this.node)) {
            this.commandEcho(msg);
            return;
        }
        if (p.node !== this.node || p.type === 'NCMD' || p.type === 'DCMD') return;
        this.counts[p.type] = (this.counts[p.type] || 0) + 1;

        ruleQosAndRetain(this, msg);
        ruleHostState(this, msg);
        switch (p.type) {
        case 'NBIRTH': this.onNbirth(msg); break;
        case 'NDEATH': this.onNdeath(msg); break;
        case 'DBIRTH': this.onDbirth(msg); break;
        case 'DDEATH': this.onDdeath(msg); break;
        case 'NDATA': case 'DDATA': this.onData(msg); break;
        default: break;
        }
    }

    commandEcho(msg) {
        if (msg.parsed.type === 'NCMD' && msg.metrics.some((m) => m.name === 'Node Control/Rebirth')) this.armRebirth(msg.atMs);
    }

    onNbirth(msg) {
        ruleNbirthSeqZero(this, msg);
        ruleNbirthRequiredMetrics(this, msg);
        ruleBdSeqProgression(this, msg);
        const decls = declarations(msg.metrics);
        this.sessions += 1;
        this.session = {
            number: this.sessions, bdSeq: msg.bdSeq, lastSeq: msg.seq, node: decls,
            devices: new Map(), aliasOwner: new Map(),
        };
        this.endedSinceLastBirth = false;
        this.trackSeq(msg.seq);
        ruleAliasesUnique(this, msg, 'node');
        if (this.rebirth && this.rebirth.armedAt !== null) {
            this.rebirth.nbirth = true;
            this.rebirth.dbirths = new Set();
        }
        this.maybeRebirthDone();
    }

    onNdeath(msg) {
        ruleNdeathBdSeq(this, msg);
        this.session = null;
        this.endedSinceLastBirth = true;
    }

    onDbirth(msg) {
        if (!ruleInSession(this, msg)) return;
        ruleSeqContinuous(this, msg);
        const dev = { alive: true, decls: declarations(msg.metrics) };
        this.session.devices.set(msg.parsed.device, dev);
        this.lastBirthOfDevice.set(msg.parsed.device, dev.decls);
        ruleAliasesUnique(this, msg, msg.parsed.device);
        if (this.rebirth && this.rebirth.nbirth) this.rebirth.dbirths.add(msg.parsed.device);
        this.maybeRebirthDone();
    }

    onDdeath(msg) {
        if (!ruleInSession(this, msg)) return;
        ruleSeqContinuous(this, msg);
        const dev = this.session.devices.get(msg.parsed.device);
        if (!dev || !dev.alive) {
            this.violate(msg, `DDEATH for device ${JSON.stringify(msg.parsed.device)} that is not alive in this session (no DBIRTH since NBIRTH or since its last DDEATH)`);
        } else {
            dev.alive = false;
        }
        if (this.rebirth) this.rebirth.alive.delete(msg.parsed.device);
        this.maybeRebirthDone();
    }

    onData(msg) {
        if (!ruleInSession(this, msg)) return;
        ruleSeqContinuous(this, msg);
        ruleNoDataDuringRebirth(this, msg);
        if (msg.parsed.type === 'DDATA') {
            if (!ruleDeviceAlive(this, msg)) return;
            ruleMetricsDeclared(this, msg, this.session.devices.get(msg.parsed.device).decls);
        } else {
            ruleMetricsDeclared(this, msg, this.session.node);
        }
    }

    trackSeq(seq) {
        if (typeof seq !== 'number') return;
        if (this.maxSeq === null || seq > this.maxSeq) this.maxSeq = seq;
    }

    maybeRebirthDone() {
        const r = this.rebirth;
        if (!r || !r.nbirth) return;
        for (const d of r.alive) if (!r.dbirths.has(d)) return;
        this.rebirth = null;
        this.rebirthsCompleted += 1;
    }

    check() {
        const violations = this.violations.slice();
        if (this.rebirth) {
            const missing = [...this.rebirth.alive].filter((d) => !this.rebirth.dbirths.has(d));
            violations.push(`rebirth requested but not completed: ${this.rebirth.nbirth ? 'NBIRTH seen' : 'no NBIRTH yet'}` +
                (missing.length ? `, no DBIRTH yet for ${missing.join(', ')}` : '') +
                ' (Sparkplug 3.0: on Node Control/Rebirth the node republishes NBIRTH and every DBIRTH)');
        }
        const devices = {};
        if (this.session) for (const [d, s] of this.session.devices) devices[d] = s.alive;
        return {
            event: 'check',
            violations,
            summary: {
                messages: this.index + 1,
                counts: { ...this.counts },
                sessions: this.sessions,
                births: { NBIRTH: this.counts.NBIRTH || 0, DBIRTH: this.counts.DBIRTH || 0 },
                session_open: this.session !== null,
                bdseq: this.session ? this.session.bdSeq : null,
                nbirth_bdseqs: this.nbirthBdSeqs.slice(),
                max_seq: this.maxSeq,
                seq_wraps: this.seqWraps,
                devices,
                rebirth_pending: this.rebirth !== null,
                rebirths_completed: this.rebirthsCompleted,
                state_online: this.hostId ? this.stateOnlineAt !== null && this.stateOfflineAt === null : null,
            },
        };
    }
}

// --- the rules, one requirement each ---------------------------------------------------------

// (a) Sparkplug 3.0 §5 (Edge Node session establishment): a session starts with NBIRTH, and the
// NBIRTH's seq is 0 (chapter 4 and the TCK; chapters 5-6 say 0-255, the TCK decides).
function ruleNbirthSeqZero(c, msg) {
    if (msg.seq !== 0) c.violate(msg, `NBIRTH seq is ${msg.seq === null ? 'missing' : msg.seq}, must be 0`);
}

// (a), (d) Nothing but NBIRTH may open a session; DBIRTH, DATA and DDEATH need one.
function ruleInSession(c, msg) {
    if (c.session) return true;
    c.violate(msg, `${msg.parsed.type} before NBIRTH (no open session: the first node message of a session must be NBIRTH)`);
    return false;
}

// (b) Sparkplug 3.0 §6.4.6 (NBIRTH): carries `bdSeq` (Int64 per chapter 5; UInt64 accepted,
// chapter 6's example) and `Node Control/Rebirth` (Boolean).
function ruleNbirthRequiredMetrics(c, msg) {
    const bd = msg.metrics.find((m) => m.name === 'bdSeq');
    if (!bd) c.violate(msg, 'NBIRTH has no bdSeq metric');
    else if (bd.datatype !== 'Int64' && bd.datatype !== 'UInt64') c.violate(msg, `NBIRTH bdSeq has datatype ${bd.datatype}, must be Int64 (UInt64 accepted)`);
    const rb = msg.metrics.find((m) => m.name === 'Node Control/Rebirth');
    if (!rb) c.violate(msg, 'NBIRTH has no "Node Control/Rebirth" metric');
    else if (rb.datatype !== 'Boolean') c.violate(msg, `NBIRTH "Node Control/Rebirth" has datatype ${rb.datatype}, must be Boolean`);
}

// (c) Sparkplug 3.0 §6.4.x (payload seq): each message after NBIRTH in a session carries the
// previous seq + 1, modulo 256. NDEATH carries none.
function ruleSeqContinuous(c, msg) {
    const s = c.session;
    if (typeof msg.seq !== 'number') {
        c.violate(msg, `${msg.parsed.type} has no seq`);
        return;
    }
    if (msg.seq > 255 || msg.seq < 0) c.violate(msg, `seq ${msg.seq} is outside 0-255`);
    if (typeof s.lastSeq === 'number') {
        const expected = (s.lastSeq + 1) % 256;
        if (msg.seq !== expected) c.violate(msg, `seq ${msg.seq}, expected ${expected} (previous ${s.lastSeq}): seq must be continuous modulo 256 within a session`);
        if (s.lastSeq === 255 && msg.seq === 0) c.seqWraps += 1;
    }
    s.lastSeq = msg.seq;
    c.trackSeq(msg.seq);
}

// (d) Sparkplug 3.0 §5 (device session): DDATA only for a device whose DBIRTH came in this
// session and that has not had a DDEATH since.
function ruleDeviceAlive(c, msg) {
    const dev = c.session.devices.get(msg.parsed.device);
    if (!dev) {
        c.violate(msg, `DDATA for device ${JSON.stringify(msg.parsed.device)} before its DBIRTH in this session`);
        return false;
    }
    if (!dev.alive) {
        c.violate(msg, `DDATA for device ${JSON.stringify(msg.parsed.device)} after its DDEATH (no new DBIRTH)`);
        return false;
    }
    return true;
}

// (e) Sparkplug 3.0 §6.4.x (metrics and aliases): every DATA metric is declared in the birth;
// where the birth gave it an alias, DATA names it by alias only.
function ruleMetricsDeclared(c, msg, decls) {
    for (const m of msg.metrics) {
        let d = null;
        if (m.alias !== null) {
            d = decls.byAlias.get(String(m.alias)) || null;
            if (!d) {
                c.violate(msg, `${metricLabel(m)} is not declared in the birth`);
                continue;
            }
            if (m.name !== null) c.violate(msg, `${metricLabel(m)} carries a name as well as its alias (DATA uses the alias only once the birth declared one)`);
        } else if (m.name !== null) {
            d = decls.byName.get(m.name) || null;
            if (!d) {
                c.violate(msg, `${metricLabel(m)} is not declared in the birth`);
                continue;
            }
            if (d.alias !== null) c.violate(msg, `${metricLabel(m)} sent by name, but the birth declared alias ${d.alias} for it`);
        } else {
            c.violate(msg, 'metric with neither name nor alias');
            continue;
        }
        if (m.datatype_sent && d.datatype !== null && DATATYPE_CODES[m.datatype] !== d.datatype) {
            c.violate(msg, `${metricLabel(m)} has datatype ${m.datatype}, the birth declared ${DATATYPES[d.datatype]}`);
        }
    }
}

// (e) Sparkplug 3.0 §6.4.x: aliases are unique across the Edge Node (NBIRTH and every DBIRTH).
function ruleAliasesUnique(c, msg, owner) {
    const owners = c.session.aliasOwner;
    for (const [a, o] of [...owners]) if (o === owner) owners.delete(a);
    const seen = new Set();
    for (const m of msg.metrics) {
        if (m.alias === null) continue;
        const a = String(m.alias);
        if (seen.has(a)) c.violate(msg, `alias ${a} declared twice in this birth`);
        seen.add(a);
        const prev = owners.get(a);
        if (prev !== undefined && prev !== owner) {
            c.violate(msg, `alias ${a} already declared by ${prev === 'node' ? 'the NBIRTH' : `the DBIRTH of ${JSON.stringify(prev)}`}: aliases must be unique across the Edge Node`);
        }
        owners.set(a, owner);
    }
}

// (f) Sparkplug 3.0 §6.4.7 (NDEATH): the will set at CONNECT carries that connection's bdSeq,
// so the NDEATH ending a session carries the bdSeq of that session's NBIRTH.
function ruleNdeathBdSeq(c, msg) {
    if (!c.session) {
        c.violate(msg, 'NDEATH with no open session');
        return;
    }
    if (msg.bdSeq === null) c.violate(msg, 'NDEATH has no bdSeq metric');
    else if (msg.bdSeq !== c.session.bdSeq) c.violate(msg, `NDEATH bdSeq ${msg.bdSeq} does not match bdSeq ${c.session.bdSeq} of the NBIRTH of the session it ends`);
}

// (f) Sparkplug 3.0 §5 (bdSeq): one more per MQTT connect, modulo 256. A repeat is right only
// for a rebirth on the same connection (no NDEATH between); going backwards is never right.
// A session that ends in a new NBIRTH with another bdSeq, without an NDEATH, lost its NDEATH.
function ruleBdSeqProgression(c, msg) {
    const bd = msg.bdSeq;
    if (bd === null) return;
    c.nbirthBdSeqs.push(bd);
    const prev = c.lastBdSeq;
    c.lastBdSeq = bd;
    if (prev === null || typeof bd !== 'number' || typeof prev !== 'number') return;
    const diff = (((bd - prev) % 256) + 256) % 256;
    if (!c.endedSinceLastBirth) {
        if (diff !== 0) c.violate(msg, `NBIRTH bdSeq ${bd} while the session with bdSeq ${prev} never ended with an NDEATH`);
        return;
    }
    if (diff === 0) c.violate(msg, `NBIRTH bdSeq ${bd} repeats the previous connection's bdSeq (must increase by 1 per connect)`);
    else if (diff >= 128) c.violate(msg, `NBIRTH bdSeq ${bd} goes backwards from ${prev}`);
}

// (g) Sparkplug 3.0 §6.4 (Node Control/Rebirth): after a rebirth request no NDATA/DDATA until the
// new NBIRTH and the DBIRTH of every device that was alive are out. Messages the broker delivered
// before our own NCMD came back were sent before the node could see the request (armRebirth).
function ruleNoDataDuringRebirth(c, msg) {
    const r = c.rebirth;
    if (!r || r.armedAt === null || msg.atMs < r.armedAt + c.rebirthGraceMs) return;
    if (!r.nbirth) {
        c.violate(msg, `${msg.parsed.type} after the rebirth request and before the new NBIRTH`);
    } else {
        const missing = [...r.alive].filter((d) => !r.dbirths.has(d));
        if (missing.length) c.violate(msg, `${msg.parsed.type} after the rebirth request before the DBIRTH of ${missing.join(', ')}`);
    }
}

// (h) Sparkplug 3.0 §5 (Primary Host Application): a node configured with a primary host births
// and publishes only while that host's STATE is online; once it goes offline the node stops
// (messages already in flight within the grace are allowed).
function ruleHostState(c, msg) {
    if (!c.hostId || !BIRTH_OR_DATA.has(msg.parsed.type)) return;
    if (c.stateOnlineAt === null) {
        c.violate(msg, `${msg.parsed.type} before the host published STATE online`);
    } else if (c.stateOfflineAt !== null && msg.atMs > c.stateOfflineAt + c.offlineGraceMs) {
        c.violate(msg, `${msg.parsed.type} ${msg.atMs - c.stateOfflineAt} ms after the host published STATE offline`);
    }
}

// (i) Sparkplug 3.0 §6.4.x: NBIRTH, DBIRTH, NDATA, DDATA and DDEATH are QoS 0, not retained
// (NDATA/DDATA may be QoS 1 when the test says --data-qos 1); NDEATH is the will, QoS 1, not
// retained.
function ruleQosAndRetain(c, msg) {
    const t = msg.parsed.type;
    if (msg.retain) c.violate(msg, `${t} is retained (retain must be false)`);
    if (t === 'NDEATH') {
        if (msg.qos !== 1) c.violate(msg, `NDEATH has QoS ${msg.qos}, must be 1`);
        return;
    }
    const allowed = (t === 'NDATA' || t === 'DDATA') ? c.dataQos : 0;
    if (msg.qos > allowed) c.violate(msg, `${t} has QoS ${msg.qos}, must be ${allowed === 0 ? '0' : `at most ${allowed}`}`);
}

// ---------------------------------------------------------------------------------------------
// Commands to the node.

/** Node Control/Rebirth as NCMD: by name (it has no alias), Boolean true. */
function encodeRebirth(nowMs) {
    return sparkplug.encodePayload({
        timestamp: nowMs,
        metrics: [{ name: 'Node Control/Rebirth', type: 'Boolean', value: true }],
    });
}

function commandValue(code, value) {
    if (code === 4 || code === 8 || code === 13) {
        if (typeof value === 'string') return Long.fromString(value, code !== 4);
        if (typeof value === 'number' && Number.isInteger(value)) return Long.fromNumber(value, code !== 4 && value >= 0);
    }
    return value;
}

/**
 * DCMD for one metric of a device, by the alias its last DBIRTH declared (by name if it declared
 * none), with the birth's datatype. `uint32Field: 'int'` moves a UInt32 from Tahu's long_value
 * to the int_value the spec names, to try both.
 */
function encodeDcmd(decl, value, nowMs, uint32Field) {
    const metric = { type: DATATYPES[decl.datatype], value: commandValue(decl.datatype, value) };
    if (decl.alias !== null) metric.alias = decl.alias;
    else metric.name = decl.name;
    let bytes = sparkplug.encodePayload({ timestamp: nowMs, metrics: [metric] });
    if (decl.datatype === 7 && uint32Field === 'int') {
        const p = Payload.decode(bytes);
        const m = p.metrics[0];
        m.intValue = Long.isLong(m.longValue) ? m.longValue.toNumber() : Number(m.longValue);
        delete m.longValue;
        bytes = Payload.encode(p).finish();
    }
    return bytes;
}

// ---------------------------------------------------------------------------------------------
// I/O shell.

function parseArgs(argv) {
    const opts = { port: null, group: null, node: null, hostId: null, dataQos: 0, offlineGraceMs: 500, rebirthGraceMs: 0, host: '127.0.0.1' };
    const take = (i) => {
        if (i + 1 >= argv.length) throw new Error(`${argv[i]} needs a value`);
        return argv[i + 1];
    };
    for (let i = 0; i < argv.length; i += 2) {
        const a = argv[i];
        if (a === '--port') opts.port = Number(take(i));
        else if (a === '--group') opts.group = take(i);
        else if (a === '--node') opts.node = take(i);
        else if (a === '--host-id') opts.hostId = take(i);
        else if (a === '--data-qos') opts.dataQos = Number(take(i));
        else if (a === '--offline-grace-ms') opts.offlineGraceMs = Number(take(i));
        else if (a === '--rebirth-grace-ms') opts.rebirthGraceMs = Number(take(i));
        else if (a === '--broker-host') opts.host = take(i);
        else throw new Error(`unknown argument ${a}`);
    }
    if (!Number.isInteger(opts.port) || opts.port <= 0 || opts.port > 65535) throw new Error('--port PORT is required (1-65535)');
    if (!opts.group) throw new Error('--group GROUP is required');
    if (!opts.node) throw new Error('--node NODE is required');
    if (opts.dataQos !== 0 && opts.dataQos !== 1) throw new Error('--data-qos must be 0 or 1');
    return opts;
}

function main() {
    let opts;
    try {
        opts = parseArgs(process.argv.slice(2));
    } catch (e) {
        process.stderr.write(`host.js: ${e.message}\nusage: host.js --port PORT --group GROUP --node NODE [--host-id HOST] [--data-qos 0|1] [--offline-grace-ms MS] [--rebirth-grace-ms MS]\n`);
        process.exit(2);
    }
    const mqtt = require('mqtt');
    const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
    const checker = new Checker(opts);
    const stateTopic = opts.hostId ? `${NAMESPACE}/STATE/${opts.hostId}` : null;
    // Sparkplug 3.0: the STATE birth carries the same timestamp as the will of that connection.
    const connectTs = Date.now();
    const statePayload = (online, ts) => JSON.stringify({ online, timestamp: ts });
    const clientOpts = {
        // MQTT 5 for "retain as published": under 3.1.1 the broker clears the retain flag of
        // live messages, and rule (i) could not see a retained NBIRTH/DATA.
        protocolVersion: 5,
        clean: true,
        clientId: `fieldbridge-host-${process.pid}-${Math.random().toString(16).slice(2, 10)}`,
        reconnectPeriod: 0,
        connectTimeout: 10000,
        keepalive: 30,
    };
    if (stateTopic) clientOpts.will = { topic: stateTopic, payload: Buffer.from(statePayload(false, connectTs)), qos: 1, retain: true };
    const client = mqtt.connect(`mqtt://${opts.host}:${opts.port}`, clientOpts);
    let index = -1;
    let quitting = false;
    let stateOnline = false;

    const quit = (code) => {
        if (quitting) return;
        quitting = true;
        const done = () => client.end(false, {}, () => {
            emit({ event: 'exit', code });
            process.stdout.write('', () => process.exit(code));
        });
        // Leaving on purpose: say so on STATE (the will fires only when the connection drops).
        if (stateTopic && stateOnline && client.connected) {
            client.publish(stateTopic, statePayload(false, connectTs), { qos: 1, retain: true }, done);
        } else {
            done();
        }
        setTimeout(() => process.exit(code), 3000).unref();
    };

    client.on('error', (e) => {
        emit({ event: 'error', error: `mqtt: ${e.message}` });
        if (!client.connected) quit(1);
    });
    client.on('close', () => {
        if (!quitting) {
            emit({ event: 'error', error: 'mqtt: connection closed' });
            quit(1);
        }
    });

    client.on('message', (topic, payload, packet) => {
        index += 1;
        const atMs = Date.now();
        const parsed = parseTopic(topic);
        const base = { event: 'message', index, topic, type: parsed ? parsed.type : null, node: parsed ? parsed.node : null, device: parsed ? parsed.device : null, qos: packet.qos, retain: !!packet.retain };
        let decoded;
        try {
            decoded = decodeMessage(payload, checker.lookup(parsed));
        } catch (e) {
            emit({ ...base, error: `not a Sparkplug payload: ${e.message}` });
            if (parsed && parsed.node === opts.node) checker.violations.push(`#${index} ${topic}: payload does not decode as Sparkplug B protobuf: ${e.message}`);
            return;
        }
        let bdSeq = null;
        if (parsed && (parsed.type === 'NBIRTH' || parsed.type === 'NDEATH')) {
            const bd = decoded.metrics.find((m) => m.name === 'bdSeq');
            bdSeq = bd ? bd.value : null;
        }
        const msg = { ...base, seq: decoded.seq, timestamp: decoded.timestamp, bdSeq, metrics: decoded.metrics };
        if (decoded.tahu_error) msg.tahu_error = decoded.tahu_error;
        emit(msg);
        checker.observe({ index, topic, parsed, qos: packet.qos, retain: !!packet.retain, seq: decoded.seq, timestamp: decoded.timestamp, bdSeq, metrics: decoded.metrics, atMs });
    });

    const commands = {
        rebirth() {
            const topic = `${NAMESPACE}/${opts.group}/NCMD/${opts.node}`;
            checker.rebirthRequested(Date.now());
            client.publish(topic, Buffer.from(encodeRebirth(Date.now())), { qos: 0, retain: false }, (e) => {
                emit(e ? { event: 'error', cmd: 'rebirth', error: e.message } : { event: 'sent', cmd: 'rebirth', topic });
            });
        },
        dcmd(c) {
            if (typeof c.device !== 'string' || typeof c.metric !== 'string' || !('value' in c)) {
                emit({ event: 'error', cmd: 'dcmd', error: 'dcmd needs "device", "metric" and "value"' });
                return;
            }
            const decls = checker.lastBirthOfDevice.get(c.device);
            const decl = decls ? decls.byName.get(c.metric) : null;
            if (!decl) {
                emit({ event: 'error', cmd: 'dcmd', error: decls ? `metric ${JSON.stringify(c.metric)} is not in the last DBIRTH of ${JSON.stringify(c.device)}` : `no DBIRTH seen for device ${JSON.stringify(c.device)}` });
                return;
            }
            let bytes;
            try {
                bytes = encodeDcmd(decl, c.value, Date.now(), c.uint32_field);
            } catch (e) {
                emit({ event: 'error', cmd: 'dcmd', error: `cannot encode ${JSON.stringify(c.value)} as ${DATATYPES[decl.datatype]}: ${e.message}` });
                return;
            }
            const topic = `${NAMESPACE}/${opts.group}/DCMD/${opts.node}/${c.device}`;
            client.publish(topic, Buffer.from(bytes), { qos: 0, retain: false }, (e) => {
                emit(e ? { event: 'error', cmd: 'dcmd', error: e.message } : { event: 'sent', cmd: 'dcmd', topic, alias: decl.alias, name: decl.alias === null ? decl.name : null, datatype: DATATYPES[decl.datatype] || null });
            });
        },
        state(c) {
            if (!stateTopic) {
                emit({ event: 'error', cmd: 'state', error: 'state needs --host-id' });
                return;
            }
            if (typeof c.online !== 'boolean') {
                emit({ event: 'error', cmd: 'state', error: 'state needs "online": true|false' });
                return;
            }
            const ts = Number.isInteger(c.timestamp) ? c.timestamp : connectTs;
            checker.stateSent(c.online, Date.now());
            client.publish(stateTopic, statePayload(c.online, ts), { qos: 1, retain: true }, (e) => {
                if (!e) stateOnline = c.online;
                emit(e ? { event: 'error', cmd: 'state', error: e.message } : { event: 'sent', cmd: 'state', topic: stateTopic, online: c.online, timestamp: ts });
            });
        },
        check() {
            emit(checker.check());
        },
        quit() {
            quit(0);
        },
    };

    client.on('connect', () => {
        client.subscribe(`${NAMESPACE}/${opts.group}/#`, { qos: 1, rap: true }, (e, granted) => {
            if (e || !granted || !granted.length || granted[0].qos > 2) {
                emit({ event: 'error', error: `subscribe failed: ${e ? e.message : JSON.stringify(granted)}` });
                quit(1);
                return;
            }
            emit({ event: 'ready', client_id: clientOpts.clientId, will_timestamp: stateTopic ? connectTs : null });
            startStdin();
        });
    });

    function startStdin() {
        let buf = '';
        process.stdin.setEncoding('utf8');
        process.stdin.on('data', (chunk) => {
            buf += chunk;
            let nl;
            while ((nl = buf.indexOf('\n')) >= 0) {
                const line = buf.slice(0, nl).trim();
                buf = buf.slice(nl + 1);
                if (!line) continue;
                let c;
                try {
                    c = JSON.parse(line);
                } catch (e) {
                    emit({ event: 'error', error: `stdin: not JSON: ${line}` });
                    continue;
                }
                const f = c && typeof c.cmd === 'string' && Object.prototype.hasOwnProperty.call(commands, c.cmd) ? commands[c.cmd] : null;
                if (!f) emit({ event: 'error', error: `stdin: unknown command ${JSON.stringify(c && c.cmd)}` });
                else f(c);
            }
        });
        process.stdin.on('end', () => quit(0));
    }
    process.on('SIGTERM', () => quit(0));
    process.on('SIGINT', () => quit(0));
}

module.exports = { Checker, decodeMessage, parseTopic, plain, encodeDcmd, encodeRebirth, DATATYPES, DATATYPE_CODES };

if (require.main === module) main();
