// Node `ws` broadcast server, a benchmark peer for ringcast (`loadgen broadcast`, `loadgen
// compare --scenario broadcast`).
//
// Usage: node broadcast.js PORT
//
// Binds 127.0.0.1 only. Relays every text and binary message to every connected client, the
// sender included: the loop of the ws README's "Server broadcast" example. Node runs
// JavaScript on one thread, so `taskset -c 0` pins all of it. Logs nothing per message; runs
// until killed.
'use strict';

const { WebSocket, WebSocketServer } = require('ws');

const port = Number.parseInt(process.argv[2], 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node broadcast.js PORT');
  process.exit(2);
}

const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096 });

wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    }
  });
});

wss.on('error', (err) => {
  console.error(`broadcast.js: ${err.message}`);
  process.exit(1);
});
