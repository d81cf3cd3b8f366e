// `models.list()` and `models.retrieve()` through the Node SDK.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI from 'openai';

import { collect, useIris } from './harness.mjs';

const env = useIris();

test('list returns the configured models in order', async () => {
  const models = await collect(env.client().models.list());

  assert.deepEqual(
    models.map((m) => m.id),
    ['sdk-model', 'other-model', 'vendor/slashed-model'],
  );
  assert.ok(models.every((m) => m.object === 'model'));
});

test("list shows only the client's models", async () => {
  const models = await collect(env.client(env.iris.key('restricted')).models.list());

  assert.deepEqual(
    models.map((m) => m.id),
    ['other-model'],
  );
});

test('retrieve a model', async () => {
  const model = await env.client().models.retrieve('sdk-model');

  assert.equal(model.id, 'sdk-model');
  assert.equal(model.object, 'model');
});

test('retrieve a model whose id has a slash', async () => {
  const model = await env.client().models.retrieve('vendor/slashed-model');

  assert.equal(model.id, 'vendor/slashed-model');
});

test('retrieve an unknown model is a NotFoundError', async () => {
  await assert.rejects(env.client().models.retrieve('no-such-model'), (error) => {
    assert.ok(error instanceof OpenAI.NotFoundError);
    assert.equal(error.code, 'model_not_found');
    return true;
  });
});
