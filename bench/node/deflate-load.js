// Closed-loop echo load with permessage-deflate, for bench/deflate-echo.sh.
//
// Usage: node deflate-load.js PORT CONNS SECONDS DEFLATE
//   CONNS connections to 127.0.0.1:PORT, each sending a 1 KiB JSON text message and waiting
//   for its echo before the next, for SECONDS. DEFLATE 1 offers permessage-deflate (threshold
//   0, context takeover allowed), 0 offers nothing. Prints "messages N extensions E" on stdout.
'use strict';

const { WebSocket } = require('ws');

const [portArg, connsArg, secondsArg, deflateArg] = process.argv.slice(2);
const port = Number.parseInt(portArg, 10);
const conns = Number.parseInt(connsArg, 10);
const seconds = Number.parseFloat(secondsArg);
const deflate = deflateArg === '1';

function message(n) {
  const parts = [];
  let s = `{"topic":"prices.eurusd","seq":${n},"data":[`;
  let i = 0;
  while (s.length + parts.join(',').length < 1000) {
    parts.push(`{"bid":1.${(n * 7 + i) % 10000},"ask":1.${(n * 13 + i) % 10000}}`);
    i += 1;
  }
  return `${s}${parts.join(',')}]}`;
}

let total = 0;
let open = 0;
let extensions = '';
let stopping = false;
const sockets = [];
for (let c = 0; c < conns; c++) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/`, {
    perMessageDeflate: deflate ? { threshold: 0 } : false,
  });
  sockets.push(ws);
  let n = c * 1000003;
  ws.on('error', (e) => {
    console.error(`error: ${e.message}`);
    process.exit(1);
  });
  ws.on('open', () => {
    open += 1;
    extensions = ws.extensions;
    if (open === conns) start();
  });
  ws.on('message', () => {
    if (stopping) return;
    total += 1;
    n += 1;
    ws.send(message(n));
  });
}

function start() {
  for (const ws of sockets) ws.send(message(0));
  setTimeout(() => {
    stopping = true;
    console.log(`messages ${total} extensions ${extensions || 'none'}`);
    for (const ws of sockets) ws.terminate();
    process.exit(0);
  }, seconds * 1000);
}
