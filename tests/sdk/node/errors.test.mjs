// Errors Iris produces itself, as the Node SDK's error classes see them.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import OpenAI from 'openai';

import { useIris } from './harness.mjs';

const env = useIris();
const messages = [{ role: 'user', content: 'Say hello' }];

/** An assert.rejects validator: the error is an instance of `cls` with these fields. */
const isError = (cls, fields) => (error) => {
  assert.ok(error instanceof cls, `expected ${cls.name}, got ${error.constructor.name}: ${error.message}`);
  for (const [name, value] of Object.entries(fields)) assert.equal(error[name], value, name);
  return true;
};

test('the Responses API is a clear BadRequestError', async () => {
  const call = env.client().responses.create({ model: 'sdk-model', input: 'Say hello' });

  await assert.rejects(call, (error) => {
    isError(OpenAI.BadRequestError, { status: 400, code: 'unsupported_api' })(error);
    assert.match(error.message, /POST \/v1\/chat\/completions/);
    assert.ok(error.requestID, 'every response carries x-request-id');
    return true;
  });
});

test('a wrong key is an AuthenticationError', async () => {
  const call = env.client('not-a-configured-key').chat.completions.create({ model: 'sdk-model', messages });

  await assert.rejects(call, (error) => {
    isError(OpenAI.AuthenticationError, { status: 401, code: 'invalid_api_key' })(error);
    assert.doesNotMatch(JSON.stringify(error.error), /not-a-configured-key/);
    assert.ok(error.requestID);
    return true;
  });
});

test('a wrong key cannot list models', async () => {
  await assert.rejects(env.client('not-a-configured-key').models.list(), OpenAI.AuthenticationError);
});

test('an unknown model is a NotFoundError', async () => {
  const call = env.client().chat.completions.create({ model: 'no-such-model', messages });

  await assert.rejects(call, isError(OpenAI.NotFoundError, { code: 'model_not_found', param: 'model' }));
});

test("a model outside the client's list is a PermissionDeniedError", async () => {
  const call = env.client(env.iris.key('restricted')).chat.completions.create({ model: 'sdk-model', messages });

  await assert.rejects(call, isError(OpenAI.PermissionDeniedError, { status: 403, code: 'model_not_allowed' }));
});

test('an API Iris does not serve is a NotFoundError', async () => {
  const call = env.client().moderations.create({ input: 'Say hello' });

  await assert.rejects(call, (error) => {
    isError(OpenAI.NotFoundError, { status: 404, code: 'not_found' })(error);
    assert.match(error.message, /\/v1\/moderations/);
    return true;
  });
});

test('an n outside OpenAI\'s range is a BadRequestError naming it', async () => {
  const call = env.client().chat.completions.create({ model: 'sdk-model', messages, n: 129 });

  await assert.rejects(call, isError(OpenAI.BadRequestError, { status: 400, code: 'invalid_request', param: 'n' }));
});

test('a URL outside an image part is a BadRequestError naming it', async () => {
  const content = [
    { type: 'text', text: 'Summarise this file.' },
    { type: 'file', file: { file_url: 'http://127.0.0.1:9/a.pdf', filename: 'a.pdf' } },
  ];
  const call = env.client().chat.completions.create({ model: 'sdk-model', messages: [{ role: 'user', content }] });

  await assert.rejects(
    call,
    isError(OpenAI.BadRequestError, { status: 400, code: 'invalid_request', param: 'messages[0].content[1].file.file_url' }),
  );
});
