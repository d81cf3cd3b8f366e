// The one Node harness that runs the real `iris` binary and the mock upstream
// example as child processes on port 0. Both Node suites import it: the SDK
// compatibility suite (tests/sdk/node/harness.mjs adds the openai client, the
// image host and `useIris()`) and the console's browser tests
// (tests/browser/harness.mjs adds Chromium and API helpers). It uses only
// Node's own modules, so it needs no package.json of its own.
//
// The binaries come from $IRIS_BIN and $IRIS_MOCK_UPSTREAM_BIN (scripts/sdk-test
// and scripts/browser-test set both), else from target/debug of this checkout.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const STARTUP_TIMEOUT_MS = 15_000;

/** The `sha256:` form Iris keeps in its config instead of a key. */
export function keyHash(key) {
  return 'sha256:' + createHash('sha256').update(key).digest('hex');
}

/** `path` if it is an executable file, else an error that says what to do (`hint`). */
export function executable(path, hint) {
  try {
    accessSync(path, constants.X_OK);
  } catch {
    throw new Error(`${path} is not there: ${hint}`);
  }
  return path;
}

function binary(envVar, fallback) {
  const path = resolve(process.env[envVar] || join(REPO, 'target', 'debug', fallback));
  return executable(path, `run scripts/sdk-test or scripts/browser-test (they build it), or set $${envVar}`);
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

/**
 * examples/mock_upstream.rs: answers chat completions, steered by `x-mock-*`
 * headers (tests/sdk/README.md; `x-mock-echo: 1` answers with the request
 * body it received). `chatRequests()` is how many chat completion requests
 * reached it so far.
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

/**
 * The config: one upstream `mock` at `upstreamURL` (`upstreamToml` goes
 * inside its `[[upstreams]]` table), `models` ({name, upstream?,
 * upstreamModel?, endpoint?: 'chat' | 'embeddings', price?: {input, cached_input?, output}}), config `clients` ({name, key, models?, team?, budget?}),
 * config `teams` ({name, budget?}), a memory store, `[admin]` when
 * `adminKey` is given, and `extraToml` last.
 */
function configToml({ upstreamURL, models, clients, teams = [], adminKey, upstreamToml, extraToml }) {
  const lines = ['[server]', 'listen = "127.0.0.1:0"', 'shutdown_grace_ms = 2000', '', '[store]', 'kind = "memory"'];
  if (adminKey !== undefined) lines.push('', '[admin]', `key = ${tomlString(keyHash(adminKey))}`);
  lines.push(
    '',
    '[[upstreams]]',
    'name = "mock"',
    `base_url = ${tomlString(upstreamURL)}`,
    'api_key = "upstream-secret-key"',
    'stream_usage = true',
    'timeout_ms = 10000',
    upstreamToml,
  );
  for (const model of models) {
    lines.push('', '[[models]]', `name = ${tomlString(model.name)}`, `upstream = ${tomlString(model.upstream ?? 'mock')}`);
    if (model.upstreamModel) lines.push(`upstream_model = ${tomlString(model.upstreamModel)}`);
    if (model.endpoint) lines.push(`endpoint = ${tomlString(model.endpoint)}`);
    if (model.price) {
      const amount = (units) => Number(units).toFixed(6); // a TOML float, to the millionth
      const { input, cached_input: cached = input, output } = model.price;
      lines.push(`price = { input = ${amount(input)}, cached_input = ${amount(cached)}, output = ${amount(output)} }`);
    }
  }
  for (const client of clients) {
    lines.push('', '[[clients]]', `name = ${tomlString(client.name)}`, `key = ${tomlString(keyHash(client.key))}`);
    if (client.models) lines.push(`models = [${client.models.map(tomlString).join(', ')}]`);
    if (client.team) lines.push(`team = ${tomlString(client.team)}`);
    if (client.budget) {
      lines.push('[clients.budget]');
      for (const [name, limit] of Object.entries(client.budget)) lines.push(`${name} = ${Math.trunc(limit)}`);
    }
  }
  for (const team of teams) {
    lines.push('', '[[teams]]', `name = ${tomlString(team.name)}`);
    if (team.budget) {
      lines.push('[teams.budget]');
      for (const [name, limit] of Object.entries(team.budget)) lines.push(`${name} = ${Math.trunc(limit)}`);
    }
  }
  return lines.join('\n') + '\n\n' + extraToml + '\n';
}

/**
 * Starts `iris serve` with a generated config (options as for `configToml`
 * above) and waits until /readyz answers 200. Answers its `origin`,
 * `baseURL`, `key(name?)` (the key of client `name`, else of the first),
 * `log()` (its output so far) and `stop()`.
 */
export async function startIris({ upstreamURL, models, clients, teams, adminKey, upstreamToml = '', extraToml = '' }) {
  const workdir = mkdtempSync(join(tmpdir(), 'iris-node-'));
  const configPath = join(workdir, 'iris.toml');
  writeFileSync(configPath, configToml({ upstreamURL, models, clients, teams, adminKey, upstreamToml, extraToml }));
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
