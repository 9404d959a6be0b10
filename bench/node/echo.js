// Node `ws` WebSocket echo server, a benchmark peer for ringcast (`loadgen compare`).
//
// Usage: node echo.js PORT
//
// Binds 127.0.0.1 only. Echoes every text and binary message back to its sender, the shape
// of the ws README examples; ws answers pings and close frames itself. Node runs JavaScript
// on one thread, so `taskset -c 0` pins all of it. Logs nothing per message; runs until
// killed.
'use strict';

const { WebSocketServer } = require('ws');

const port = Number.parseInt(process.argv[2], 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node echo.js PORT');
  process.exit(2);
}

const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096 });

wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    ws.send(data, { binary: isBinary });
  });
});

wss.on('error', (err) => {
  console.error(`echo.js: ${err.message}`);
  process.exit(1);
});
