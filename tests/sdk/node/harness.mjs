// Runs the real `iris` binary and the mock upstream example as child
// processes on port 0, for the SDK compatibility suite.
//
// The binaries come from $IRIS_BIN and $IRIS_MOCK_UPSTREAM_BIN (scripts/sdk-test
// sets both), else from target/debug of this checkout. A test file calls
// `useIris()` at its top: it starts a mock upstream and an Iris before the
// file's tests and stops them after. `startImageHost()` serves
// tests/sdk/images on 127.0.0.2 for vision tests.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before } from 'node:test';

import OpenAI from 'openai';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
/** The test images both SDK suites use (see tests/sdk/README.md). */
export const IMAGES = join(REPO, 'tests', 'sdk', 'images');
const STARTUP_TIMEOUT_MS = 15_000;

/** The `sha256:` form Iris keeps in its config instead of the key. */
export function keyHash(key) {
  return 'sha256:' + createHash('sha256').update(key).digest('hex');
}

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

function binary(envVar, fallback) {
  const path = resolve(process.env[envVar] || join(REPO, 'target', 'debug', fallback));
  try {
    accessSync(path, constants.X_OK);
  } catch {
    throw new Error(`${path} is not built: run scripts/sdk-test, or set $${envVar}`);
  }
  return path;
}

// Children are killed when this test process ends, however it ends.
const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => process.exit(1));
}

/** A child server; its stderr is kept (and drained, so it never blocks). */
class Child {
  constructor(name, argv, env) {
    this.name = name;
    this.output = '';
    this.proc = spawn(argv[0], argv.slice(1), {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.add(this.proc);
    this.exited = new Promise((resolveExit) => {
      this.proc.once('exit', (code, signal) => {
        children.delete(this.proc);
        resolveExit({ code, signal });
      });
    });
    const keep = (data) => {
      this.output += data.toString();
    };
    this.proc.stdout.on('data', keep);
    this.proc.stderr.on('data', keep);
  }

  /** Resolves with the first output line matching `pattern`; rejects if the process exits first. */
  waitForLine(pattern) {
    return new Promise((resolveLine, reject) => {
      const check = () => {
        for (const line of this.output.split('\n')) {
          const match = line.match(pattern);
          if (match) {
            finish();
            resolveLine(match);
            return true;
          }
        }
        return false;
      };
      const onExit = ({ code, signal }) => {
        finish();
        reject(new Error(`${this.name} exited (${code ?? signal}):\n${this.output}`));
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`${this.name} did not start in time:\n${this.output}`));
      }, STARTUP_TIMEOUT_MS);
      const onData = () => check();
      const finish = () => {
        clearTimeout(timer);
        this.proc.stdout.off('data', onData);
        this.proc.stderr.off('data', onData);
        this.proc.off('exit', onExit);
      };
      if (check()) return;
      this.proc.stdout.on('data', onData);
      this.proc.stderr.on('data', onData);
      this.proc.once('exit', onExit);
    });
  }

  async stop() {
    if (this.proc.exitCode !== null || this.proc.signalCode !== null) return;
    this.proc.kill('SIGTERM');
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), 5_000);
    await this.exited;
    clearTimeout(timer);
  }
}

/**
 * examples/mock_upstream.rs: answers chat completions, steered by `x-mock-*`
 * headers (`x-mock-echo: 1` answers with the request body it received).
 * `chatRequests()` is how many chat completion requests reached it so far.
 */
export async function startMockUpstream() {
  const child = new Child(
    'mock_upstream',
    [binary('IRIS_MOCK_UPSTREAM_BIN', 'examples/mock_upstream'), '127.0.0.1:0'],
    {},
  );
  try {
    const [, baseURL] = await child.waitForLine(/listening on (http:\/\/127\.0\.0\.1:\d+\/v1)/);
    const origin = baseURL.replace(/\/v1$/, '');
    const chatRequests = async () => (await (await fetch(origin + '/mock/stats')).json()).chat_requests;
    return { baseURL, chatRequests, stop: () => child.stop() };
  } catch (error) {
    await child.stop();
    throw error;
  }
}

const tomlString = (value) => JSON.stringify(value); // a JSON string is a valid TOML basic string

function configToml({ upstreamURL, models, clients, upstreamToml, extraToml }) {
  const lines = [
    '[server]',
    'listen = "127.0.0.1:0"',
    'shutdown_grace_ms = 2000',
    '',
    '[store]',
    'kind = "memory"',
    '',
    '[[upstreams]]',
    'name = "mock"',
    `base_url = ${tomlString(upstreamURL)}`,
    'api_key = "upstream-secret-key"',
    'stream_usage = true',
    'timeout_ms = 10000',
    upstreamToml,
  ];
  for (const model of models) {
    lines.push('', '[[models]]', `name = ${tomlString(model.name)}`, 'upstream = "mock"');
    if (model.upstreamModel) lines.push(`upstream_model = ${tomlString(model.upstreamModel)}`);
  }
  for (const client of clients) {
    lines.push('', '[[clients]]', `name = ${tomlString(client.name)}`, `key = ${tomlString(keyHash(client.key))}`);
    if (client.models) lines.push(`models = [${client.models.map(tomlString).join(', ')}]`);
    if (client.budget) {
      lines.push('[clients.budget]');
      for (const [name, limit] of Object.entries(client.budget)) lines.push(`${name} = ${Math.trunc(limit)}`);
    }
  }
  return lines.join('\n') + '\n\n' + extraToml + '\n';
}

/**
 * Starts `iris serve` with a generated config against `upstreamURL`.
 * A client may have a `budget` (`{ requests_per_minute: 60 }`: its
 * `[clients.budget]`). `upstreamToml` goes into the mock's `[[upstreams]]`
 * table (`inline_images = true`...); `extraToml` is appended (`[images]`...).
 */
export async function startIris({
  upstreamURL,
  models = DEFAULT_MODELS,
  clients = DEFAULT_CLIENTS,
  upstreamToml = '',
  extraToml = '',
}) {
  const workdir = mkdtempSync(join(tmpdir(), 'iris-sdk-'));
  const configPath = join(workdir, 'iris.toml');
  writeFileSync(configPath, configToml({ upstreamURL, models, clients, upstreamToml, extraToml }));
  // JSON logs: the listen address is a field, with no colour codes around it.
  const child = new Child('iris', [binary('IRIS_BIN', 'iris'), 'serve', '--config', configPath], {
    IRIS_LOG: 'info',
    IRIS_LOG_FORMAT: 'json',
  });
  const stop = async () => {
    await child.stop();
    rmSync(workdir, { recursive: true, force: true });
  };
  try {
    const { input: line } = await child.waitForLine(/iris is serving/);
    const origin = 'http://' + JSON.parse(line).listen;
    await waitReady(origin, child);
    return {
      origin,
      baseURL: origin + '/v1',
      /** The key of the client `name`, else of the first one. */
      key: (name) => clients.find((c) => name === undefined || c.name === name).key,
      log: () => child.output,
      stop,
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

async function waitReady(origin, child) {
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  for (;;) {
    try {
      const response = await fetch(origin + '/readyz', { signal: AbortSignal.timeout(2_000) });
      if (response.status === 200) return;
    } catch {
      // not accepting yet
    }
    if (Date.now() > deadline) throw new Error(`iris never became ready:\n${child.output}`);
    await new Promise((r) => setTimeout(r, 50));
  }
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
