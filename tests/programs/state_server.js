// A small stateful Node.js service: an in-memory Map filled at the start and changed by
// requests, served over HTTP.
//
//   GET  /         -> JSON: {"size": entries, "boot": a random id drawn at the cold start,
//                            "requests": requests answered, "ticks": a setInterval count}
//   GET  /k/NAME   -> the value of NAME (404 if absent)
//   POST /k/NAME   -> the request body becomes the value of NAME
'use strict';
const http = require('http');
const crypto = require('crypto');

const map = new Map();
const entries = parseInt(process.env.ENTRIES || '100000', 10);
for (let i = 0; i < entries; i++) map.set(`key-${i}`, `value-${i}`);
const boot = crypto.randomUUID();
let requests = 0;
let ticks = 0;
setInterval(() => { ticks++; }, 50);

const server = http.createServer((req, res) => {
  requests++;
  if (req.url.startsWith('/k/')) {
    const key = decodeURIComponent(req.url.slice(3));
    if (req.method === 'POST') {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        map.set(key, Buffer.concat(chunks).toString());
        res.end(JSON.stringify({ size: map.size }));
      });
      return;
    }
    const v = map.get(key);
    res.statusCode = v === undefined ? 404 : 200;
    res.end(v === undefined ? '' : v);
    return;
  }
  res.end(JSON.stringify({ size: map.size, boot, requests, ticks }));
});
server.listen(parseInt(process.env.PORT, 10), '127.0.0.1', () => {
  console.log(`state_server: ${map.size} entries, listening on 127.0.0.1:${process.env.PORT}`);
});
