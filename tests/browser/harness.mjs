// The console's browser tests: the shared harness (tests/support/harness.mjs
// runs the real `iris` binary, debug build, and the mock upstream example on
// port 0) plus headless Chromium (Debian's package) through playwright-core.
//
// The browser: $IRIS_CHROMIUM, else /usr/bin/chromium. Nothing is downloaded.

import { chromium } from 'playwright-core';

import { REPO, executable, keyHash, startIris as startSharedIris, startMockUpstream } from '../support/harness.mjs';

export { REPO, keyHash, startMockUpstream };

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

// What the console's views need beyond the shared config: a spend log
// flushed every 100 ms (the spend views read it soon after each request), no
// retries (an upstream error is one request and one error in the tables),
// and a 10-minute cooldown (the cooling deployment the tests look at stays
// cooling while they run).
const CONSOLE_TOML = [
  '[spend_log]',
  'kind = "sqlite"',
  'flush_ms = 100',
  '',
  '[routing]',
  'retries = 0',
  'cooldown_ms = 600000',
].join('\n');

/**
 * Starts `iris serve` (tests/support/harness.mjs) with `[admin]` keyed by
 * `adminKey`, one mock upstream serving `models`, config `clients` ({name,
 * key, models?, team?, budget?}) and `teams` ({name, budget?}), a memory
 * store and the spend log above.
 */
export function startIris({ upstreamURL, adminKey, models, clients, teams }) {
  return startSharedIris({ upstreamURL, adminKey, models, clients, teams, extraToml: CONSOLE_TOML });
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
