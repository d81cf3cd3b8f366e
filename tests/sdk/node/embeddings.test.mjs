// `client.embeddings.create` through Iris with the Node SDK: base64 (the
// SDK's default, decoded by the SDK into floats) and floats, renamed
// upstream, charged the upstream's count, and the SDK's errors for a chat
// model and for input of another shape.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI from 'openai';

import { DEFAULT_MODELS, useIris } from './harness.mjs';

const env = useIris({
  models: [...DEFAULT_MODELS, { name: 'sdk-embed', upstreamModel: 'upstream-embed', endpoint: 'embeddings' }],
  clients: [{ name: 'embedder', key: 'iris-sdk-embed-key', budget: { tokens_per_day: 1000 } }],
});

test('base64 vectors arrive as floats through the SDK', async () => {
  // The SDK asks for base64 unless told otherwise, and decodes it itself.
  const result = await env.client().embeddings.create({ model: 'sdk-embed', input: ['first text', 'second'] });

  assert.deepEqual(result.data.map((item) => item.index), [0, 1]);
  for (const item of result.data) {
    assert.equal(item.embedding.length, 4);
    assert.ok(item.embedding.every((x) => typeof x === 'number'));
  }
  assert.equal(result.model, 'upstream-embed', 'the mock echoes the name Iris sent');
  assert.equal(result.usage.prompt_tokens, 3 + 2);
});

test('float vectors and dimensions pass through', async () => {
  const result = await env.client().embeddings.create({
    model: 'sdk-embed',
    input: 'hello',
    encoding_format: 'float',
    dimensions: 6,
  });

  assert.equal(result.data[0].embedding.length, 6);
});

test("the upstream's count is what the budget is charged", async () => {
  const used = async () => (await env.client().get('/usage')).windows.tokens_per_day.used;
  const before = await used();

  await env.client().embeddings.create(
    { model: 'sdk-embed', input: 'counted' },
    { headers: { 'x-mock-usage': '{"prompt_tokens": 41, "total_tokens": 41}' } },
  );

  assert.equal((await used()) - before, 41);
});

test('a chat model is not an embeddings model', async () => {
  await assert.rejects(env.client().embeddings.create({ model: 'sdk-model', input: 'hello' }), (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError);
    assert.equal(error.code, 'model_not_supported');
    assert.equal(error.param, 'model');
    return true;
  });
});

test('input of another shape is a bad request', async () => {
  await assert.rejects(env.client().embeddings.create({ model: 'sdk-embed', input: [] }), (error) => {
    assert.ok(error instanceof OpenAI.BadRequestError);
    assert.equal(error.code, 'invalid_request');
    assert.equal(error.param, 'input');
    return true;
  });
});
