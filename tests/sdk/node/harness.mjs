// Runs the real `iris` binary and the mock upstream example as child
// processes on port 0, for the SDK compatibility suite.
//
// The binaries come from $IRIS_BIN and $IRIS_MOCK_UPSTREAM_BIN (scripts/sdk-test
// sets both), else from target/debug of this checkout. A test file calls
// `useIris()` at its top: it starts a mock upstream and an Iris before the
// file's tests and stops them after.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before } from 'node:test';

import OpenAI from 'openai';

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
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

/** examples/mock_upstream.rs: answers chat completions, steered by `x-mock-*` headers. */
export async function startMockUpstream() {
  const child = new Child(
    'mock_upstream',
    [binary('IRIS_MOCK_UPSTREAM_BIN', 'examples/mock_upstream'), '127.0.0.1:0'],
    {},
  );
  try {
    const [, baseURL] = await child.waitForLine(/listening on (http:\/\/127\.0\.0\.1:\d+\/v1)/);
    return { baseURL, stop: () => child.stop() };
  } catch (error) {
    await child.stop();
    throw error;
  }
}

const tomlString = (value) => JSON.stringify(value); // a JSON string is a valid TOML basic string

function configToml({ upstreamURL, models, clients, extraToml }) {
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
  ];
  for (const model of models) {
    lines.push('', '[[models]]', `name = ${tomlString(model.name)}`, 'upstream = "mock"');
    if (model.upstreamModel) lines.push(`upstream_model = ${tomlString(model.upstreamModel)}`);
  }
  for (const client of clients) {
    lines.push('', '[[clients]]', `name = ${tomlString(client.name)}`, `key = ${tomlString(keyHash(client.key))}`);
    if (client.models) lines.push(`models = [${client.models.map(tomlString).join(', ')}]`);
  }
  return lines.join('\n') + '\n\n' + extraToml + '\n';
}

/**
 * Starts `iris serve` with a generated config against `upstreamURL`.
 * `extraToml` is appended: `[images]` settings, more `[[clients]]` with their
 * own `[clients.budget]`...
 */
export async function startIris({
  upstreamURL,
  models = DEFAULT_MODELS,
  clients = DEFAULT_CLIENTS,
  extraToml = '',
}) {
  const workdir = mkdtempSync(join(tmpdir(), 'iris-sdk-'));
  const configPath = join(workdir, 'iris.toml');
  writeFileSync(configPath, configToml({ upstreamURL, models, clients, extraToml }));
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
      key: (name = 'sdk') => clients.find((c) => c.name === name).key,
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
 * Registers before/after hooks that run a mock upstream and an Iris (options
 * as for `startIris`) around the calling test file. Returns an object whose
 * `iris`, `upstream` and `client()` are usable inside tests.
 */
export function useIris(options = {}) {
  const env = {
    iris: undefined,
    upstream: undefined,
    /** An OpenAI client for this Iris; no retries unless asked, so an error surfaces at once. */
    client(key = env.iris.key(), clientOptions = {}) {
      return new OpenAI({
        baseURL: env.iris.baseURL,
        apiKey: key,
        maxRetries: 0,
        timeout: 20_000,
        ...clientOptions,
      });
    },
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

/** Collects an async iterable into an array. */
export async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}
