// Chat completions through Iris with the official Node SDK: plain, streamed,
// and an upstream error passed through.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI from 'openai';

import { collect, useIris } from './harness.mjs';

const env = useIris();
const messages = [{ role: 'user', content: 'Say hello' }];
const contentOf = (chunks) => chunks.map((c) => c.choices[0]?.delta?.content ?? '').join('');

test('a plain completion returns the upstream answer', async () => {
  const completion = await env.client().chat.completions.create({ model: 'sdk-model', messages });

  assert.equal(completion.choices[0].message.content, 'Hello from the mock upstream.');
  assert.equal(completion.choices[0].finish_reason, 'stop');
  // The mock echoes the model it received: Iris sent the upstream's name and
  // returned the response as the upstream sent it.
  assert.equal(completion.model, 'upstream-sdk-model');
  assert.equal(completion.usage.completion_tokens, 7);
});

test('a model without rename is sent as named', async () => {
  const completion = await env.client().chat.completions.create({ model: 'other-model', messages });

  assert.equal(completion.model, 'other-model');
});

test('a stream yields chunks and no usage chunk unless asked', async () => {
  const stream = await env
    .client()
    .chat.completions.create(
      { model: 'sdk-model', messages, stream: true },
      { headers: { 'x-mock-chunks': '4' } },
    );
  const chunks = await collect(stream);

  assert.equal(contentOf(chunks), 'word0 word1 word2 word3 ');
  assert.equal(chunks.length, 6); // role, 4 words, finish
  assert.equal(chunks.at(-1).choices[0].finish_reason, 'stop');
  // Iris asks the upstream for usage (stream_usage = true) but must not pass
  // on a chunk this client did not ask for.
  assert.ok(chunks.every((c) => c.choices.length === 1));
  assert.ok(chunks.every((c) => c.usage == null));
});

test('a stream with include_usage ends with the usage chunk', async () => {
  const stream = await env.client().chat.completions.create({
    model: 'sdk-model',
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = await collect(stream);

  assert.equal(contentOf(chunks), 'word0 word1 word2 ');
  const last = chunks.at(-1);
  assert.deepEqual(last.choices, []);
  assert.equal(last.usage.completion_tokens, 3);
  assert.ok(chunks.slice(0, -1).every((c) => c.usage == null));
});

test('the stream helper assembles the final completion', async () => {
  // `chat.completions.stream` is the SDK's higher-level streaming API.
  const stream = env.client().chat.completions.stream({ model: 'sdk-model', messages });
  const final = await stream.finalChatCompletion();

  assert.equal(final.choices[0].message.content, 'word0 word1 word2 ');
  assert.equal(final.model, 'upstream-sdk-model');
});

test('an upstream error surfaces as the matching SDK error', async () => {
  const call = env
    .client()
    .chat.completions.create({ model: 'sdk-model', messages }, { headers: { 'x-mock-status': '422' } });

  await assert.rejects(call, (error) => {
    assert.ok(error instanceof OpenAI.UnprocessableEntityError, `got ${error.constructor.name}`);
    assert.equal(error.status, 422);
    // The upstream's body, passed through untouched.
    assert.deepEqual(error.error, {
      message: 'mock upstream error',
      type: 'upstream_error',
      param: null,
      code: 'mock_error',
    });
    assert.equal(error.code, 'mock_error');
    assert.match(error.message, /mock upstream error/);
    return true;
  });
});

test('an upstream error on a stream rejects before any chunk', async () => {
  const call = env
    .client()
    .chat.completions.create(
      { model: 'sdk-model', messages, stream: true },
      { headers: { 'x-mock-status': '422' } },
    );

  await assert.rejects(call, (error) => {
    assert.ok(error instanceof OpenAI.UnprocessableEntityError, `got ${error.constructor.name}`);
    assert.equal(error.code, 'mock_error');
    return true;
  });
});

test('the request id is visible with the raw response', async () => {
  const { data, response, request_id } = await env
    .client()
    .chat.completions.create({ model: 'sdk-model', messages })
    .withResponse();

  assert.ok(response.headers.get('x-request-id'));
  assert.equal(request_id, response.headers.get('x-request-id'));
  assert.equal(data.choices[0].message.content, 'Hello from the mock upstream.');
});

test("the client's own request id is echoed", async () => {
  const response = await env
    .client()
    .chat.completions.create({ model: 'sdk-model', messages }, { headers: { 'x-request-id': 'sdk-trace-42' } })
    .asResponse();

  assert.equal(response.headers.get('x-request-id'), 'sdk-trace-42');
});

test('a stream interrupted mid-way throws instead of ending quietly', async () => {
  // The upstream dies after two words. Iris cannot retry once words have
  // reached the client, so it ends the stream with an `error` event and no
  // `[DONE]`, and the SDK throws: a truncated answer never looks complete.
  const before = await env.upstream.chatRequests();
  const stream = await env
    .client()
    .chat.completions.create(
      { model: 'sdk-model', messages, stream: true },
      { headers: { 'x-mock-die-after': '2' } },
    );
  const chunks = [];
  await assert.rejects(
    (async () => {
      for await (const chunk of stream) chunks.push(chunk);
    })(),
    (error) => {
      assert.ok(error instanceof OpenAI.APIError, `expected an APIError, got ${error.constructor.name}: ${error.message}`);
      assert.equal(error.code, 'upstream_stream_interrupted');
      assert.equal(error.type, 'server_error');
      assert.ok(error.message);
      return true;
    },
  );
  assert.equal(contentOf(chunks), 'word0 word1 '); // what came before the failure was relayed
  assert.ok(chunks.every((c) => c.choices[0]?.finish_reason == null));
  assert.equal(await env.upstream.chatRequests(), before + 1); // not retried
});
