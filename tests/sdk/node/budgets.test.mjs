// Budgets as the Node SDK meets them: a spent per-minute budget is a
// RateLimitError the SDK's own retry gets past once the window refills; a
// spent daily budget is one the SDK does not retry (it would otherwise sleep
// for the whole Retry-After, hours); `GET /v1/usage` through the SDK's
// generic `get`. Each test runs its own Iris, so budgets never leak between
// tests.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import OpenAI from 'openai';

import { clientFor, startIris, startMockUpstream } from './harness.mjs';

const messages = [{ role: 'user', content: 'Say hello' }];
// A retry the SDK should not make can sleep for hours (it honours any
// Retry-After): fail instead of hanging the suite.
const limit = { timeout: 15_000 };
const ask = (client) => client.chat.completions.create({ model: 'sdk-model', messages, max_tokens: 16 });

let upstream;
before(async () => {
  upstream = await startMockUpstream();
});
after(() => upstream?.stop());

/** An Iris with this one client, stopped after the test. */
async function irisWith(t, client) {
  const iris = await startIris({ upstreamURL: upstream.baseURL, clients: [client] });
  t.after(() => iris.stop());
  return iris;
}

/** A `fetch` for the SDK that keeps every response, retries included. */
function recordingFetch() {
  const responses = [];
  return {
    responses,
    statuses: () => responses.map((r) => r.status),
    fetch: async (url, init) => {
      const response = await fetch(url, init);
      responses.push(response);
      return response;
    },
  };
}

/** Sends requests (no retries) until one is refused; at most `limit`. */
async function spendUntilRefused(client, limit) {
  for (let i = 0; i < limit; i++) {
    try {
      await ask(client);
    } catch (error) {
      assert.ok(error instanceof OpenAI.RateLimitError, `got ${error.constructor.name}: ${error.message}`);
      return error;
    }
  }
  assert.fail(`no 429 after ${limit} requests`);
}

test('a spent minute budget is retried by the SDK after the refill', limit, async (t) => {
  // GCRA: a burst of 60, then one request a second.
  const iris = await irisWith(t, { name: 'rpm', key: 'iris-sdk-rpm-key', budget: { requests_per_minute: 60 } });

  const error = await spendUntilRefused(clientFor(iris), 70);

  assert.equal(error.status, 429);
  assert.equal(error.code, 'rate_limit_exceeded');
  const retryAfterMs = Number(error.headers.get('retry-after-ms'));
  assert.ok(retryAfterMs > 0 && retryAfterMs <= 1000, `retry-after-ms ${retryAfterMs}`);
  assert.equal(error.headers.get('retry-after'), '1'); // whole seconds, rounded up
  assert.equal(error.headers.get('x-ratelimit-limit-requests'), '60');
  assert.equal(error.headers.get('x-ratelimit-remaining-requests'), '0');

  const recorder = recordingFetch();
  const patient = clientFor(iris, undefined, { maxRetries: 2, fetch: recorder.fetch });
  const before = await upstream.chatRequests();
  const started = performance.now();
  const completion = await ask(patient);
  const elapsed = performance.now() - started;

  assert.equal(completion.choices[0].message.content, 'Hello from the mock upstream.');
  // Refused, then the SDK waited what `retry-after-ms` said and got through:
  // the wait Iris announced was long enough, and not much longer.
  assert.deepEqual(recorder.statuses(), [429, 200]);
  const waited = Number(recorder.responses[0].headers.get('retry-after-ms'));
  assert.ok(elapsed >= waited * 0.9 && elapsed < waited + 1000, `waited ${waited} ms, took ${elapsed} ms`);
  assert.equal(await upstream.chatRequests(), before + 1, 'the 429 went nowhere');
});

test('a spent daily budget is not retried', limit, async (t) => {
  // The mock charges about 45 tokens a request: two fit, the third does not.
  const iris = await irisWith(t, { name: 'daily', key: 'iris-sdk-daily-key', budget: { tokens_per_day: 100 } });
  await spendUntilRefused(clientFor(iris), 10);

  const recorder = recordingFetch();
  const stubborn = clientFor(iris, undefined, { maxRetries: 5, fetch: recorder.fetch });
  const before = await upstream.chatRequests();
  const started = performance.now();
  await assert.rejects(ask(stubborn), (error) => {
    assert.ok(error instanceof OpenAI.RateLimitError, `got ${error.constructor.name}: ${error.message}`);
    assert.equal(error.code, 'insufficient_quota');
    assert.equal(error.headers.get('x-should-retry'), 'false');
    assert.ok(Number(error.headers.get('retry-after')) > 0, 'until the UTC midnight');
    return true;
  });
  const elapsed = performance.now() - started;

  // One attempt, answered at once: this SDK honours any Retry-After, so a
  // retry would have slept until midnight.
  assert.deepEqual(recorder.statuses(), [429]);
  assert.ok(elapsed < 1000, `took ${elapsed} ms`);
  assert.equal(await upstream.chatRequests(), before);
});

test('a request larger than the daily budget is not retried', limit, async (t) => {
  const iris = await irisWith(t, { name: 'small', key: 'iris-sdk-small-key', budget: { tokens_per_day: 1000 } });
  const recorder = recordingFetch();
  const stubborn = clientFor(iris, undefined, { maxRetries: 5, fetch: recorder.fetch });
  const before = await upstream.chatRequests();
  const started = performance.now();

  const call = stubborn.chat.completions.create({ model: 'sdk-model', messages, max_tokens: 5000 });

  await assert.rejects(call, (error) => {
    assert.ok(error instanceof OpenAI.RateLimitError, `got ${error.constructor.name}: ${error.message}`);
    assert.equal(error.code, 'insufficient_quota');
    // Waiting never helps, so no Retry-After: only x-should-retry keeps the
    // SDK from its default backoff.
    assert.equal(error.headers.get('retry-after'), null);
    assert.equal(error.headers.get('x-should-retry'), 'false');
    return true;
  });
  const elapsed = performance.now() - started;
  assert.deepEqual(recorder.statuses(), [429]);
  assert.ok(elapsed < 1000, `took ${elapsed} ms`);
  assert.equal(await upstream.chatRequests(), before);
});

test("GET /v1/usage through the SDK's generic get", limit, async (t) => {
  const iris = await irisWith(t, {
    name: 'metered',
    key: 'iris-sdk-metered-key',
    budget: { requests_per_minute: 10, tokens_per_day: 100_000 },
  });
  const client = clientFor(iris);
  let spent = 0;
  for (let i = 0; i < 2; i++) spent += (await ask(client)).usage.total_tokens;

  const usage = await client.get('/usage');

  assert.equal(usage.object, 'usage');
  assert.equal(usage.client, 'metered');
  const requests = usage.windows.requests_per_minute;
  assert.deepEqual([requests.limit, requests.used, requests.remaining], [10, 2, 8]);
  const day = usage.windows.tokens_per_day;
  // Settled to what the upstream reported, not to the estimates.
  assert.deepEqual([day.limit, day.used, day.remaining], [100_000, spent, 100_000 - spent]);
  assert.ok(day.reset_at > Date.now() / 1000);
});
