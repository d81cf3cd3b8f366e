// The SDK compatibility suite's harness: the shared one
// (tests/support/harness.mjs runs the real `iris` binary and the mock
// upstream on port 0) plus what the SDK tests add. A test file calls
// `useIris()` at its top: it starts a mock upstream and an Iris before the
// file's tests and stops them after. `startImageHost()` serves
// tests/sdk/images on 127.0.0.2 for vision tests.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { after, before } from 'node:test';

import OpenAI from 'openai';

import { REPO, keyHash, startIris as startSharedIris, startMockUpstream } from '../../support/harness.mjs';

export { keyHash, startMockUpstream };

/** The test images both SDK suites use (see tests/sdk/README.md). */
export const IMAGES = join(REPO, 'tests', 'sdk', 'images');

// The default setup. `sdk-model` is renamed upstream, so a response's `model`
// (the mock echoes what it received) proves the rename reached the upstream.
export const DEFAULT_MODELS = [
  { name: 'sdk-model', upstreamModel: 'upstream-sdk-model' },
  { name: 'other-model' },
  // Real upstreams name models like this; the SDKs put the id in the path.
  { name: 'vendor/slashed-model' },
];
export const DEFAULT_CLIENTS = [
  { name: 'sdk', key: 'iris-sdk-test-key' },
  { name: 'restricted', key: 'iris-sdk-restricted-key', models: ['other-model'] },
];

/**
 * Starts `iris serve` with a generated config against `upstreamURL`
 * (tests/support/harness.mjs), with the default models and clients unless
 * given. A client may have a `budget` (`{ requests_per_minute: 60 }`: its
 * `[clients.budget]`). `upstreamToml` goes into the mock's `[[upstreams]]`
 * table (`inline_images = true`...); `extraToml` is appended (`[images]`...).
 */
export function startIris({ models = DEFAULT_MODELS, clients = DEFAULT_CLIENTS, ...options }) {
  return startSharedIris({ models, clients, ...options });
}

/**
 * An OpenAI client for `iris` (as `startIris` returns it), with the key of
 * its first client unless given; no retries unless asked, so an error
 * surfaces at once.
 */
export function clientFor(iris, key = iris.key(), clientOptions = {}) {
  return new OpenAI({
    baseURL: iris.baseURL,
    apiKey: key,
    maxRetries: 0,
    timeout: 20_000,
    ...clientOptions,
  });
}

/**
 * Registers before/after hooks that run a mock upstream and an Iris (options
 * as for `startIris`) around the calling test file. Returns an object whose
 * `iris`, `upstream` and `client()` are usable inside tests.
 */
export function useIris(options = {}) {
  const env = {
    iris: undefined,
    upstream: undefined,
    /** An OpenAI client for this Iris; see `clientFor`. */
    client: (key, clientOptions) => clientFor(env.iris, key, clientOptions),
  };
  before(async () => {
    env.upstream = await startMockUpstream();
    env.iris = await startIris({ upstreamURL: env.upstream.baseURL, ...options });
  });
  after(async () => {
    // The log is gone with its process; IRIS_SDK_SHOW_LOG=1 prints it first.
    if (process.env.IRIS_SDK_SHOW_LOG && env.iris) console.error(env.iris.log());
    await env.iris?.stop();
    await env.upstream?.stop();
  });
  return env;
}

const IMAGE_TYPES = { '.png': 'image/png', '.jpg': 'image/jpeg', '.gif': 'image/gif' };

/**
 * A plain HTTP server on 127.0.0.2, port 0, serving the files of
 * tests/sdk/images: `url('cat.png')`. `paths` lists what it served.
 */
export async function startImageHost() {
  const paths = [];
  const server = createServer((request, response) => {
    paths.push(request.url);
    const name = request.url.slice(1);
    const type = IMAGE_TYPES[name.slice(name.lastIndexOf('.'))];
    if (!/^[\w.-]+$/.test(name) || !type) {
      response.writeHead(404).end();
      return;
    }
    try {
      const body = readFileSync(join(IMAGES, name));
      response.writeHead(200, { 'content-type': type, 'content-length': body.length }).end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolveListen, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.2', resolveListen);
  });
  const origin = `http://127.0.0.2:${server.address().port}`;
  return {
    paths,
    url: (name) => `${origin}/${name}`,
    stop: () =>
      new Promise((resolveClose) => {
        server.close(resolveClose);
        server.closeAllConnections(); // Iris keeps its fetch connections alive
      }),
  };
}

/** Collects an async iterable into an array. */
export async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}
