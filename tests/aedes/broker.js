// aedes as an independent MQTT 3.1.1 broker for tests/interop.rs, started by the test:
//   node tests/aedes/broker.js --port PORT [--user USER --password PASSWORD]
// Loopback only. With --user, every other login is refused (CONNACK 5, not authorised).
// Persistence is aedes' default (in memory): a restart loses retained messages and sessions.
'use strict';
const net = require('net');

const args = process.argv.slice(2);
function arg(name) {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
}
const port = Number(arg('--port'));
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: broker.js --port PORT [--user USER --password PASSWORD]');
  process.exit(2);
}
const user = arg('--user');
const password = arg('--password');

const aedes = require('aedes')();
if (user !== undefined) {
  aedes.authenticate = (client, u, p, done) => {
    const ok = u === user && p !== undefined && p !== null && p.toString() === password;
    if (!ok) {
      const e = new Error('not authorised');
      e.returnCode = 5;
      return done(e, false);
    }
    done(null, true);
  };
}
aedes.on('clientError', (client, e) => console.error(`client ${client && client.id}: ${e.message}`));
const server = net.createServer(aedes.handle);
server.listen(port, '127.0.0.1', () => console.log(`aedes listening on 127.0.0.1:${port}`));
server.on('error', (e) => {
  console.error(`aedes: ${e.message}`);
  process.exit(1);
});
