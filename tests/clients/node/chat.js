// A Node.js client of lmesh's public API, built only from protos/ and the README's contract: it finds the
// gateway through Consul (CONSUL_HTTP_ADDR), authenticates with `authorization: Bearer <key>`, and exercises
// Chat and ListModels. It prints one JSON object of what it saw; tests/test_e2e.py judges it.
// Usage: CONSUL_HTTP_ADDR=host:port LMESH_API_KEY=key node chat.js PROTO_ROOT
// Over TLS: LMESH_GATEWAY_CA=ca.pem (the CA the gateway's certificate chains to) picks a gateway whose Consul meta
// says `tls`; with LMESH_CLIENT_CERT and LMESH_CLIENT_KEY too it also calls the gateway's client-certificate
// port (meta `client_cert_port`) with that certificate and no key.
'use strict';
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const path = require('path');

const protoRoot = process.argv[2];
const definition = loader.loadSync(path.join(protoRoot, 'lmesh/gateway/v1/gateway.proto'), {
  includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true,
});
const Gateway = grpc.loadPackageDefinition(definition).lmesh.gateway.v1.Gateway;

// The typed error details every lmesh error carries in the trailer `grpc-status-details-bin`: a google.rpc.Status
// (google/rpc/status.proto) holding details of google/rpc/error_details.proto. The googleapis protos are not in
// protos/, so the few messages read here are declared inline for protobufjs (which @grpc/proto-loader brings).
const str = (id) => ({ type: 'string', id });
const rpc = protobuf.Root.fromJSON({ nested: { google: { nested: {
  protobuf: { nested: {
    Any: { fields: { type_url: str(1), value: { type: 'bytes', id: 2 } } },
    Duration: { fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } } },
  } },
  rpc: { nested: {
    Status: { fields: { code: { type: 'int32', id: 1 }, message: str(2),
                        details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 } } },
    ErrorInfo: { fields: { reason: str(1), domain: str(2), metadata: { keyType: 'string', type: 'string', id: 3 } } },
    BadRequest: { fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
                  nested: { FieldViolation: { fields: { field: str(1), description: str(2) } } } },
    RetryInfo: { fields: { retry_delay: { type: 'google.protobuf.Duration', id: 1 } } },
    QuotaFailure: { fields: { violations: { rule: 'repeated', type: 'Violation', id: 1 } },
                    nested: { Violation: { fields: { subject: str(1), description: str(2), quota_id: str(5),
                                                     quota_value: { type: 'int64', id: 7 } } } } },
  } },
} } } });

// The Status's details by type name (`ErrorInfo`, `BadRequest`, ...), or null when the trailer is absent.
function typedDetails(trailers) {
  const [raw] = trailers ? trailers.get('grpc-status-details-bin') : [];
  if (!raw) return null;
  const status = rpc.lookupType('google.rpc.Status').decode(raw);
  const details = { code: status.code, message: status.message };
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);  // type.googleapis.com/google.rpc.X
    const type = rpc.lookup(name);
    if (type) details[type.name] = type.toObject(type.decode(any.value), { longs: String, defaults: true });
  }
  return details;
}
const apiKey = process.env.LMESH_API_KEY;
const FRANCE = [{ role: 'user', content: 'What is the capital of France?' }];

const tls = process.env.LMESH_GATEWAY_CA ? {
  ca: fs.readFileSync(process.env.LMESH_GATEWAY_CA),
  cert: process.env.LMESH_CLIENT_CERT ? fs.readFileSync(process.env.LMESH_CLIENT_CERT) : null,
  key: process.env.LMESH_CLIENT_KEY ? fs.readFileSync(process.env.LMESH_CLIENT_KEY) : null,
} : null;

// A passing gateway that serves what this client speaks (TLS or plaintext): its address and its client-certificate
// address (null when it takes no client certificates).
async function findGateway() {
  const consul = process.env.CONSUL_HTTP_ADDR || '127.0.0.1:8500';
  const base = consul.includes('://') ? consul : `http://${consul}`;
  const reply = await fetch(`${base}/v1/health/service/lmesh-gateway?passing=true`);
  const entries = (await reply.json()).filter((e) => ((e.Service.Meta || {}).tls === 'true') === (tls !== null));
  if (!entries.length) throw new Error(`no passing lmesh-gateway ${tls ? 'with' : 'without'} TLS in Consul`);
  const { Service, Node } = entries[0];
  const host = Service.Address || Node.Address;
  const certPort = (Service.Meta || {}).client_cert_port;
  return { address: `${host}:${Service.Port}`, certAddress: certPort ? `${host}:${certPort}` : null };
}

function metadata(key) {
  const md = new grpc.Metadata();
  if (key !== null) md.add('authorization', `Bearer ${key}`);
  return md;
}

function errorOf(e) {
  const trailers = e.metadata ? e.metadata.getMap() : {};
  return { code: grpc.status[e.code], details: e.details, retry_after_ms: trailers['retry-after-ms'] || null,
           typed: typedDetails(e.metadata) };
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
  const { address, certAddress } = await findGateway();
  const client = new Gateway(address, tls ? grpc.credentials.createSsl(tls.ca) : grpc.credentials.createInsecure());
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
  if (tls && tls.cert && tls.key) {
    // The client certificate is the credential: no key is sent.
    if (!certAddress) throw new Error(`the gateway at ${address} takes no client certificates`);
    const certified = new Gateway(certAddress, grpc.credentials.createSsl(tls.ca, tls.key, tls.cert));
    out.certificate = {
      models: await listModels(certified, null),
      greedy: await chat(certified, start({}), { key: null }),
    };
    certified.close();
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { process.stderr.write(`${e.stack}\n`); process.exit(1); });
