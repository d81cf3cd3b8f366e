// Runs the real `iris` binary (debug build) and the mock upstream example as
// child processes on port 0, and headless Chromium (Debian's package) through
// playwright-core, for the operator console's browser tests.
//
// Binaries: $IRIS_BIN and $IRIS_MOCK_UPSTREAM_BIN (scripts/browser-test sets
// both), else target/debug of this checkout. The browser: $IRIS_CHROMIUM,
// else /usr/bin/chromium. Nothing is downloaded.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const STARTUP_TIMEOUT_MS = 15_000;

/** The flags the browser runs with: no sandbox (root in CI), nothing phoning home. */
export const CHROMIUM_FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

/** The `sha256:` form Iris keeps in its config instead of a key. */
export function keyHash(key) {
  return 'sha256:' + createHash('sha256').update(key).digest('hex');
}

function executable(path, hint) {
  try {
    accessSync(path, constants.X_OK);
  } catch {
    throw new Error(`${path} is not there: ${hint}`);
  }
  return path;
}

function binary(envVar, fallback) {
  const path = resolve(process.env[envVar] || join(REPO, 'target', 'debug', fallback));
  return executable(path, `run scripts/browser-test, or set $${envVar}`);
}

// Children are killed when this test process ends, however it ends.
const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => process.exit(1));
}

/** A child server; its output is kept (and drained, so it never blocks). */
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

/** examples/mock_upstream.rs, steered by `x-mock-*` request headers (tests/sdk/README.md). */
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

const toml = (value) => JSON.stringify(value); // a JSON string is a valid TOML basic string

/**
 * The config: `[admin]` with `adminKey`, one mock upstream serving `models`
 * (its `upstreamToml` inside its table), config `clients` ({name, key,
 * models?, budget?}), a memory store and spend log flushed every 100 ms.
 */
function configToml({ upstreamURL, adminKey, models, clients, upstreamToml = '' }) {
  const lines = [
    '[server]',
    'listen = "127.0.0.1:0"',
    'shutdown_grace_ms = 2000',
    '',
    '[store]',
    'kind = "memory"',
    '',
    '[spend_log]',
    'kind = "sqlite"',
    'flush_ms = 100',
    '',
    '[admin]',
    `key = ${toml(keyHash(adminKey))}`,
    '',
    '[routing]',
    'retries = 0',
    'cooldown_ms = 600000',
    '',
    '[[upstreams]]',
    'name = "mock"',
    `base_url = ${toml(upstreamURL)}`,
    'api_key = "upstream-secret-key"',
    'stream_usage = true',
    'timeout_ms = 10000',
    upstreamToml,
  ];
  for (const model of models) {
    lines.push('', '[[models]]', `name = ${toml(model.name)}`, `upstream = ${toml(model.upstream ?? 'mock')}`);
  }
  for (const client of clients) {
    lines.push('', '[[clients]]', `name = ${toml(client.name)}`, `key = ${toml(keyHash(client.key))}`);
    if (client.models) lines.push(`models = [${client.models.map(toml).join(', ')}]`);
    if (client.budget) {
      lines.push('[clients.budget]');
      for (const [name, limit] of Object.entries(client.budget)) lines.push(`${name} = ${Math.trunc(limit)}`);
    }
  }
  return lines.join('\n') + '\n';
}

/** Starts `iris serve` with the config above; answers its origin and a few helpers. */
export async function startIris(options) {
  const workdir = mkdtempSync(join(tmpdir(), 'iris-browser-'));
  const configPath = join(workdir, 'iris.toml');
  writeFileSync(configPath, configToml(options));
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
    return { origin, log: () => child.output, stop };
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

/** Headless Chromium from the system's package, with the flags above. */
export function launchBrowser() {
  const executablePath = executable(
    process.env.IRIS_CHROMIUM || '/usr/bin/chromium',
    'install Debian\'s chromium (scripts/browser-test does), or set $IRIS_CHROMIUM',
  );
  return chromium.launch({ executablePath, headless: true, args: CHROMIUM_FLAGS });
}

/** A chat completion with `key`; answers the status and the parsed body. */
export async function chat(origin, key, { model, content = 'Say hello', headers = {}, stream = false } = {}) {
  const response = await fetch(origin + '/v1/chat/completions', {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ model, messages: [{ role: 'user', content }], max_tokens: 16, stream }),
  });
  const text = await response.text();
  return { status: response.status, text };
}

/** An admin API call; answers the status and the parsed body. */
export async function admin(origin, adminKey, method, path, body) {
  const response = await fetch(origin + path, {
    method,
    headers: { authorization: `Bearer ${adminKey}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, json: text ? JSON.parse(text) : null };
}
