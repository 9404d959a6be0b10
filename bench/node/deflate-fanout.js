// Fan-out with permessage-deflate, for bench/deflate-fanout.sh.
//
// Usage: node deflate-fanout.js PORT SUBSCRIBERS MESSAGES
//   SUBSCRIBERS ws clients subscribe to one topic of ringcast's broker on 127.0.0.1:PORT,
//   offering permessage-deflate (threshold 0, context takeover allowed); one more connection
//   publishes MESSAGES 1 KiB JSON messages there, each after every subscriber received the
//   previous one. Prints "deliveries N extensions E" on stdout.
'use strict';

const { WebSocket } = require('ws');

const [portArg, subsArg, msgsArg] = process.argv.slice(2);
const url = `ws://127.0.0.1:${Number.parseInt(portArg, 10)}/`;
const subs = Number.parseInt(subsArg, 10);
const messages = Number.parseInt(msgsArg, 10);

function data(n) {
  const parts = [];
  let i = 0;
  while (parts.join(',').length < 950) {
    parts.push(`{"bid":1.${(n * 7 + i) % 10000},"ask":1.${(n * 13 + i) % 10000}}`);
    i += 1;
  }
  return `[${parts.join(',')}]`;
}

const fail = (why) => {
  console.error(`FAIL: ${why}`);
  process.exit(1);
};

let ready = 0;
let received = 0;
let sent = 0;
let extensions = '';
let publisher;

function publishNext() {
  if (sent === messages) {
    console.log(`deliveries ${received} extensions ${extensions || 'none'}`);
    process.exit(0);
  }
  sent += 1;
  publisher.send(
    `{"type":"publish","topic":"prices.eurusd","data":${data(sent)}}`,
  );
}

for (let s = 0; s < subs; s++) {
  const ws = new WebSocket(url, { perMessageDeflate: { threshold: 0 } });
  ws.on('error', (e) => fail(e.message));
  ws.on('open', () => {
    extensions = ws.extensions;
    ws.send('{"type":"subscribe","id":1,"topic":"prices.eurusd"}');
  });
  ws.on('message', (msg) => {
    const text = msg.toString();
    if (text.includes('"ack"')) {
      ready += 1;
      if (ready === subs) {
        publisher = new WebSocket(url, { perMessageDeflate: false });
        publisher.on('error', (e) => fail(e.message));
        publisher.on('open', publishNext);
      }
      return;
    }
    if (!text.includes('"message"')) return;
    received += 1;
    if (received === sent * subs) publishNext();
  });
}
