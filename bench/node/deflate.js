// permessage-deflate with Node `ws`, the second implementation ringcast's is checked against
// (engine/tests/deflate.rs, the differential tests).
//
// Usage:
//   node deflate.js client PORT COUNT BITS NO_CONTEXT
//     connects to ringcast's echo on 127.0.0.1:PORT offering permessage-deflate with window
//     bits BITS both ways (and no context takeover both ways when NO_CONTEXT is 1), sends
//     COUNT JSON messages of growing size, checks each echo, prints "ok COUNT EXTENSIONS" on stderr.
//   node deflate.js server PORT
//     an echo server with permessage-deflate on (threshold 0, context takeover allowed);
//     prints "listening" on stderr once bound.
'use strict';

const { WebSocket, WebSocketServer } = require('ws');

const [mode, portArg, countArg, bitsArg, noContextArg] = process.argv.slice(2);
const port = Number.parseInt(portArg, 10);

function message(n) {
  const parts = [];
  for (let i = 0; i < 1 + (n % 40); i++) {
    parts.push(`{"bid":1.${(n * 7 + i) % 10000},"ask":1.${(n * 13 + i) % 10000}}`);
  }
  return `{"topic":"prices.eurusd","seq":${n},"data":[${parts.join(',')}]}`;
}

if (mode === 'server') {
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port,
    perMessageDeflate: { threshold: 0 },
  });
  wss.on('listening', () => console.error('listening'));
  wss.on('connection', (ws) => {
    ws.on('error', () => {});
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  });
} else if (mode === 'client') {
  const count = Number.parseInt(countArg, 10);
  const bits = Number.parseInt(bitsArg, 10);
  const noContext = noContextArg === '1';
  const ws = new WebSocket(`ws://127.0.0.1:${port}/`, {
    perMessageDeflate: {
      threshold: 0,
      clientMaxWindowBits: bits,
      serverMaxWindowBits: bits,
      clientNoContextTakeover: noContext,
      serverNoContextTakeover: noContext,
    },
  });
  let n = 0;
  const fail = (why) => {
    console.error(`FAIL: ${why}`);
    process.exit(1);
  };
  ws.on('error', (e) => fail(e.message));
  ws.on('close', (code, reason) => {
    if (n < count) fail(`closed ${code} ${reason} after ${n} messages`);
  });
  ws.on('open', () => ws.send(message(0)));
  ws.on('message', (data) => {
    const want = message(n);
    if (data.toString() !== want) fail(`echo ${n} differs`);
    n += 1;
    if (n === count) {
      console.error(`ok ${count} ${ws.extensions}`);
      ws.close(1000);
      return;
    }
    ws.send(message(n));
  });
} else {
  console.error('usage: node deflate.js client PORT COUNT BITS NO_CONTEXT | server PORT');
  process.exit(2);
}
