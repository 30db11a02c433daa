// A Node.js client of lmesh's public API, built only from protos/ and the README's contract: it finds the
// gateway through Consul (CONSUL_HTTP_ADDR), authenticates with `authorization: Bearer <key>`, and exercises
// Chat and ListModels. It prints one JSON object of what it saw; tests/test_e2e.py judges it.
// Usage: CONSUL_HTTP_ADDR=host:port LMESH_API_KEY=key node chat.js PROTO_ROOT
'use strict';
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const path = require('path');

const protoRoot = process.argv[2];
const definition = loader.loadSync(path.join(protoRoot, 'lmesh/gateway/v1/gateway.proto'), {
  includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true,
});
const Gateway = grpc.loadPackageDefinition(definition).lmesh.gateway.v1.Gateway;
const apiKey = process.env.LMESH_API_KEY;
const FRANCE = [{ role: 'user', content: 'What is the capital of France?' }];

async function findGateway() {
  const consul = process.env.CONSUL_HTTP_ADDR || '127.0.0.1:8500';
  const base = consul.includes('://') ? consul : `http://${consul}`;
  const reply = await fetch(`${base}/v1/health/service/lmesh-gateway?passing=true`);
  const entries = await reply.json();
  if (!entries.length) throw new Error('no passing lmesh-gateway in Consul');
  const { Service, Node } = entries[0];
  return `${Service.Address || Node.Address}:${Service.Port}`;
}

function metadata(key) {
  const md = new grpc.Metadata();
  if (key !== null) md.add('authorization', `Bearer ${key}`);
  return md;
}

function errorOf(e) {
  const trailers = e.metadata ? e.metadata.getMap() : {};
  return { code: grpc.status[e.code], details: e.details, retry_after_ms: trailers['retry-after-ms'] || null };
}

// One Chat stream: `first` is the first request; `cancelAfter` sends Cancel after that many responses.
function chat(client, first, { key = apiKey, cancelAfter = 0 } = {}) {
  return new Promise((resolve) => {
    const call = client.Chat(metadata(key), { deadline: new Date(Date.now() + 60000) });
    const responses = [];
    call.on('data', (response) => {
      responses.push(response);
      if (cancelAfter && responses.length === cancelAfter) { call.write({ cancel: {} }); call.end(); }
    });
    // 'status' comes once, after every message; 'error' repeats a non-OK status and must be listened to.
    call.on('error', () => {});
    call.on('status', (status) => {
      if (status.code !== grpc.status.OK) { resolve({ error: errorOf(status), responses }); return; }
      const last = responses[responses.length - 1];
      resolve({
        text: responses.map((r) => r.delta).join(''),
        finish_reason: last.finish_reason,
        unfinished_before_last: responses.slice(0, -1).every((r) => r.finish_reason === 'FINISH_REASON_UNSPECIFIED'),
        usage: last.usage,
        model: last.model,
        id: last.id,
        messages: responses.length,
        logprobs: responses.flatMap((r) => r.logprobs).map((l) => ({
          token: l.token, bytes_hex: Buffer.from(l.bytes).toString('hex'), token_id: l.token_id,
          logprob: l.logprob, top: l.top_logprobs.map((t) => t.token_id),
        })),
      });
    });
    call.write(first);
    if (!cancelAfter) call.end();
  });
}

function listModels(client, key) {
  return new Promise((resolve) => client.ListModels({}, metadata(key),
    (e, reply) => resolve(e ? { error: errorOf(e) } : reply)));
}

(async () => {
  const address = await findGateway();
  const client = new Gateway(address, grpc.credentials.createInsecure());
  const start = (fields) => ({ start: { messages: FRANCE, max_tokens: 32, ...fields } });
  const out = { gateway: address };
  out.models = await listModels(client, apiKey);
  out.models_without_key = await listModels(client, null);
  out.greedy = await chat(client, start({ model: 'default', logprobs: true, top_logprobs: 2 }));
  out.stopped = await chat(client, start({ stop: ['Paris'] }));
  out.seeded = [await chat(client, start({ temperature: 0.9, top_p: 0.95, top_k: 50, seed: '42' })),
                await chat(client, start({ temperature: 0.9, top_p: 0.95, top_k: 50, seed: '42' }))];
  out.cancelled = await chat(client, start({
    messages: [{ role: 'user', content: 'Write a very long story about a dragon.' }], max_tokens: 300,
  }), { cancelAfter: 3 });
  out.errors = {
    no_key: (await chat(client, start({}), { key: null })).error,
    wrong_key: (await chat(client, start({}), { key: 'lmk_wrong' })).error,
    unknown_model: (await chat(client, start({ model: 'no-such-model' }))).error,
    max_tokens: (await chat(client, start({ max_tokens: 0 }))).error,
    temperature: (await chat(client, start({ temperature: 5 }))).error,
    role: (await chat(client, start({ messages: [{ role: 'wizard', content: 'hi' }] }))).error,
    cancel_first: (await chat(client, { cancel: {} })).error,
  };
  client.close();
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { process.stderr.write(`${e.stack}\n`); process.exit(1); });
