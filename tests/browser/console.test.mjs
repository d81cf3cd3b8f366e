// The operator console after a mixed run, in headless Chromium: what it shows
// matches the admin API, its buttons act on the API, values from clients are
// text, it asks nothing of any other origin and keeps the key to the tab.
//
// One Iris for the file: config clients (one named like markup), managed
// ones made through the API, then a mixed run (plain and streamed requests,
// an upstream error, an upstream 429 that cools a deployment down). The
// tests run in order; the ones that change clients come after the ones that
// read totals.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';

import { REPO, admin, chat, launchBrowser, startIris, startMockUpstream } from './harness.mjs';
import { Recorder, clientRow, logIn, openConsole, rows, submitKey, teamRow } from './page.mjs';

const ADMIN_KEY = 'iris-admin-browser-test';
const MARKUP = '<img src=x onerror=alert(1)>';
const CONFIG_CLIENTS = [
  { name: 'alpha', key: 'iris-alpha-key', budget: { tokens_per_day: 1_000_000, requests_per_minute: 1_000 } },
  { name: 'beta', key: 'iris-beta-key', models: ['model-b'], team: 'research' },
  { name: MARKUP, key: 'iris-markup-key' },
];
const CONFIG_TEAMS = [{ name: 'research', budget: { tokens_per_day: 2_000_000, requests_per_minute: 500, cost_per_day: 5 } }];
// model-b is priced (per million tokens), so spend has a cost.
const MODELS = [{ name: 'model-a' }, { name: 'model-b', price: { input: 2.5, cached_input: 1.25, output: 10 } }, { name: 'model-c' }];
const numbers = new Intl.NumberFormat('en-US');
const fmt = (n) => numbers.format(n);
const amounts = new Intl.NumberFormat('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 6 });
const money = (n) => amounts.format(n);
/**
 * Usage the mock reports instead of its own count: 1000 prompt tokens (400
 * cached), 250 completion tokens. On model-b: 600 * 2.50 + 400 * 1.25 + 250 *
 * 10.00 = 4500 per million tokens, 0.0045.
 */
const USAGE = { 'x-mock-usage': JSON.stringify({ prompt_tokens: 1000, completion_tokens: 250, total_tokens: 1250, prompt_tokens_details: { cached_tokens: 400 } }) };
/** beta (research's one member) makes two such requests: research's cost today. */
const RESEARCH_COST = '0.009';
/** A prompt of about 1,000 tokens (the mock counts a token per 4 bytes of body). */
const LONG = 'lorem ipsum '.repeat(340);

let upstream;
let iris;
let browser;
const keys = {};
const recorder = new Recorder();
let requestsMade = 0;

async function run(key, options, expected = 200) {
  const answer = await chat(iris.origin, key, options);
  assert.equal(answer.status, expected, answer.text);
  requestsMade += 1;
}

const usage = async (by) => {
  const today = new Date();
  const since = `${today.toISOString().slice(0, 7)}-01`;
  const answer = await admin(iris.origin, ADMIN_KEY, 'GET', `/admin/usage?since=${since}&by=${by}`);
  assert.equal(answer.status, 200);
  return answer.json;
};

before(async () => {
  upstream = await startMockUpstream();
  iris = await startIris({ upstreamURL: upstream.baseURL, adminKey: ADMIN_KEY, models: MODELS, clients: CONFIG_CLIENTS, teams: CONFIG_TEAMS });
  const blue = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/teams', { name: 'blue', budget: { tokens_per_month: 3_000_000 } });
  assert.equal(blue.status, 201);
  for (const name of ['team-a', 'team-b']) {
    const created = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/clients', {
      name,
      budget: name === 'team-a' ? { tokens_per_day: 50_000 } : undefined,
      team: name === 'team-b' ? 'blue' : undefined,
    });
    assert.equal(created.status, 201);
    keys[name] = created.json.key;
  }

  // The mixed run.
  for (let i = 0; i < 3; i++) await run('iris-alpha-key', { model: 'model-a', content: LONG });
  await run('iris-alpha-key', { model: 'model-b', stream: true });
  await run('iris-beta-key', { model: 'model-b', headers: USAGE });
  await run('iris-beta-key', { model: 'model-b', content: LONG, headers: USAGE });
  await run('iris-beta-key', { model: 'model-b', headers: { 'x-mock-status': '500' } }, 500);
  await run('iris-markup-key', { model: 'model-a' });
  await run(keys['team-a'], { model: 'model-a', content: LONG });
  await run(keys['team-a'], { model: 'model-b', stream: true });
  await run(keys['team-b'], { model: 'model-b' });
  // An upstream 429 puts model-c's deployment in cooldown (10 minutes here).
  await run(keys['team-b'], { model: 'model-c', headers: { 'x-mock-status': '429' } }, 429);

  // The spend log flushes every 100 ms: wait until it holds the whole run.
  const deadline = Date.now() + 10_000;
  while ((await usage('client')).total?.requests !== requestsMade) {
    assert.ok(Date.now() < deadline, 'the spend log never caught up with the run');
    await new Promise((r) => setTimeout(r, 100));
  }

  browser = await launchBrowser();
});

after(async () => {
  if (process.env.IRIS_BROWSER_SHOW_LOG && iris) console.error(iris.log());
  await browser?.close();
  await iris?.stop();
  await upstream?.stop();
});

test('a wrong admin key shows the API\'s error and no data', async () => {
  const expected = await admin(iris.origin, 'iris-not-the-admin-key', 'GET', '/admin/clients');
  assert.equal(expected.status, 401);
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  const asked = [];
  page.on('request', (request) => {
    const path = new URL(request.url()).pathname;
    if (!path.startsWith('/admin/ui')) asked.push(path);
  });

  await submitKey(page, 'iris-not-the-admin-key');

  await page.waitForFunction(() => document.getElementById('login-error').textContent !== '');
  assert.equal(await page.textContent('#login-error'), expected.json.error.message);
  assert.equal(await page.isVisible('#app'), false);
  assert.equal(await page.isVisible('#nav'), false);
  assert.equal(await page.locator('#app tbody tr').count(), 0);
  assert.equal(await page.locator('#app svg').count(), 0);
  assert.deepEqual(asked, ['/admin/clients'], 'one check of the key, no data asked for');
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'a refused key is not kept');
  await context.close();
});

test('logged in: the mixed run\'s totals per client and model, as the API has them', async () => {
  const { context, page, response } = await openConsole(browser, recorder, iris.origin);
  const policy = response.headers()['content-security-policy'];
  assert.match(policy, /default-src 'none'/);
  assert.match(policy, /frame-ancestors 'none'/);
  await logIn(page, ADMIN_KEY);

  for (const [by, table] of [['client', '#spend-client'], ['model', '#spend-model'], ['team', '#spend-team']]) {
    const report = await usage(by);
    assert.equal(report.currency, 'USD');
    const expected = report.data
      .map((row) => [row[by] ?? '(no team)', fmt(row.requests), fmt(row.errors), fmt(row.prompt_tokens), fmt(row.completion_tokens), money(row.cost)])
      .sort();
    const shown = (await rows(page, `${table} tbody tr`)).sort();
    assert.deepEqual(shown, expected, `spend by ${by}`);
    const total = report.total;
    assert.deepEqual(await rows(page, `${table} tfoot tr`), [
      ['Total', fmt(total.requests), fmt(total.errors), fmt(total.prompt_tokens), fmt(total.completion_tokens), money(total.cost)],
    ]);
    assert.equal(await page.textContent(`${table} thead th:last-child`), 'Cost (USD)');
  }
  const total = (await usage('client')).total.cost;
  assert.ok(total > 0.009, `the period's cost: ${total}`);
  assert.equal(await page.textContent('#spend-total-cost'), `${money(total)} USD`);
  const clients = await usage('client');
  assert.equal(clients.total.requests, requestsMade);
  assert.equal(clients.data.find((r) => r.client === 'beta').errors, 1, 'the 500 and nothing else');

  // Numbers have thousands separators.
  const alpha = (await rows(page, '#spend-client tbody tr[data-client="alpha"]'))[0];
  const alphaPrompt = clients.data.find((r) => r.client === 'alpha').prompt_tokens;
  assert.ok(alphaPrompt >= 3000, `alpha's prompt tokens: ${alphaPrompt}`);
  assert.match(alpha[3], /^\d{1,3}(,\d{3})+$/);

  // The budget bars: alpha's tokens today, used / limit, as the API has them.
  const listed = (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/clients')).json.data;
  const day = listed.find((c) => c.name === 'alpha').usage.tokens_per_day;
  assert.equal(day.limit, 1_000_000);
  const window = clientRow(page, 'alpha').locator('.window', { hasText: 'tokens per day' });
  assert.equal(await window.locator('.figures').textContent(), `${fmt(day.used)} / ${fmt(day.limit)}`);
  assert.equal(await window.locator('.bar').getAttribute('aria-valuenow'), String(day.used));
  assert.equal(await clientRow(page, 'team-a').locator('td').nth(1).locator('time').count(), 1, 'managed: created at');

  // On a laptop screen every table fits its box: no sideways scrolling.
  const scrolled = await page.$$eval('#app .scroll', (boxes) =>
    boxes.filter((box) => box.scrollWidth > box.clientWidth).map((box) => `${box.firstElementChild.id}: ${box.scrollWidth} > ${box.clientWidth}`),
  );
  assert.deepEqual(scrolled, []);

  // Charts are drawn, with a size, and the biggest bar is not a sliver.
  for (const chart of ['#chart-client', '#chart-model', '#chart-days']) {
    const box = await page.locator(`${chart} svg`).boundingBox();
    assert.ok(box && box.width > 100 && box.height > 40, `${chart}: ${JSON.stringify(box)}`);
    const widest = await page.$$eval(`${chart} rect`, (rects) => Math.max(...rects.map((r) => r.getBoundingClientRect().width)));
    const tallest = await page.$$eval(`${chart} rect`, (rects) => Math.max(...rects.map((r) => r.getBoundingClientRect().height)));
    assert.ok(widest > 5 && tallest > 5, `${chart}: bars ${widest}×${tallest}`);
  }
  const days = await page.locator('#chart-days rect').count();
  assert.equal(days, 30);

  // Upstreams: attempts and failures per deployment, as the API has them.
  const upstreams = (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/upstreams')).json.data;
  for (const row of upstreams) {
    const shown = (await rows(page, `#upstreams-table tbody tr[data-deployment="${row.deployment}"]`))[0];
    assert.equal(shown[3], fmt(row.attempts_5m), row.deployment);
    assert.equal(shown[4], fmt(row.failures_5m), row.deployment);
  }

  if (process.env.IRIS_UPDATE_SCREENSHOT === '1') {
    mkdirSync(join(REPO, 'docs'), { recursive: true });
    await page.screenshot({ path: join(REPO, 'docs', 'console.png'), fullPage: true });
  }
  await context.close();
});

test('the teams table shows each team\'s source, members and budget bars as the API has them; client rows name their team', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  await teamRow(page, 'blue').waitFor();
  const teams = (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/teams')).json.data;
  assert.deepEqual(teams.map((t) => t.name), ['research', 'blue']);
  const shown = await rows(page, '#teams-table tbody tr');
  assert.deepEqual(shown.map((r) => [r[0], r[2]]), [['research', 'beta'], ['blue', 'team-b']], 'names and members');
  assert.equal(shown[0][1], 'config');
  assert.match(shown[1][1], /^managed\s*created /);
  assert.equal(await teamRow(page, 'blue').locator('td').nth(1).locator('time').count(), 1, 'managed: created at');
  for (const team of teams) {
    for (const [name, window] of Object.entries(team.usage)) {
      if (window.limit === null) continue;
      const bar = teamRow(page, team.name).locator('.window', { hasText: name.replaceAll('_', ' ') });
      const figures = name.startsWith('cost_') ? `${money(window.used)} / ${money(window.limit)} USD` : `${fmt(window.used)} / ${fmt(window.limit)}`;
      assert.equal(await bar.locator('.figures').textContent(), figures, `${team.name} ${name}`);
      assert.equal(await bar.locator('.bar').getAttribute('aria-valuemax'), String(window.limit));
    }
  }
  assert.equal(await teamRow(page, 'research').locator('.window').count(), 3, 'research: a bar per limit');
  assert.equal(await teamRow(page, 'blue').locator('.window').count(), 1, 'blue: a bar per limit');
  assert.equal(await clientRow(page, 'beta').locator('td.team').textContent(), 'research');
  assert.equal(await clientRow(page, 'team-b').locator('td.team').textContent(), 'blue');
  assert.equal(await clientRow(page, 'alpha').locator('td.team').textContent(), '–');
  await context.close();
});

test('a team\'s cost bar shows what its clients spent, and the spend tables their cost', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  await teamRow(page, 'research').waitFor();
  // research's one member, beta, spent the scripted usage twice: 0.009 of 5.
  const bar = teamRow(page, 'research').locator('.window', { hasText: 'cost per day' });
  assert.equal(await bar.locator('.figures').textContent(), `${RESEARCH_COST} / 5.00 USD`);
  assert.equal(await bar.locator('.bar').getAttribute('aria-valuenow'), RESEARCH_COST);
  assert.equal(await bar.locator('.bar').getAttribute('aria-valuemax'), '5');
  const fill = await bar.locator('.fill').evaluate((node) => node.style.width);
  assert.equal(fill, '0.2%', 'used / limit: 0.009 / 5, to a tenth of a percent');
  // The spend tables: beta's cost, research's the same, in the cost column.
  const beta = (await rows(page, '#spend-client tbody tr[data-client="beta"]'))[0];
  assert.equal(beta[5], RESEARCH_COST);
  const research = (await rows(page, '#spend-team tbody tr[data-team="research"]'))[0];
  assert.deepEqual([research[0], research[1], research[5]], ['research', '3', RESEARCH_COST], 'its two requests and the 500 (which cost nothing)');
  assert.equal(await page.textContent('#spend-team thead th:last-child'), 'Cost (USD)');
  // The chart by client shows beta's cost beside its tokens.
  const chart = await page.locator('#chart-client svg text.cost').allTextContents();
  assert.ok(chart.includes(`2,500 · ${RESEARCH_COST} USD`), JSON.stringify(chart));
  await context.close();
});

test('a cooldown\'s end shows in the viewer\'s zone, with UTC on hover', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const upstreams = (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/upstreams')).json.data;
  const cooling = upstreams.find((u) => u.deployment.endsWith('model-c'));
  assert.equal(cooling.state, 'cooling_down');
  const until = new Date(cooling.cooling_until * 1000);

  const time = page.locator(`#upstreams-table tr[data-deployment="${cooling.deployment}"] time`);
  assert.match(await time.locator('..').textContent(), /cooling down until/);
  assert.equal(await time.getAttribute('title'), `${until.toISOString().slice(0, 19).replace('T', ' ')} UTC`);
  // Shown in Asia/Kolkata (UTC+5:30, the context's zone): its hour and minute.
  const local = new Date(until.getTime() + 330 * 60_000);
  const [, hour, minute, half] = (await time.textContent()).match(/(\d{1,2}):(\d{2}):\d{2}\s?(AM|PM)/);
  assert.equal((Number(hour) % 12) + (half === 'PM' ? 12 : 0), local.getUTCHours());
  assert.equal(Number(minute), local.getUTCMinutes());
  await context.close();
});

test('a client named like markup shows as text and runs nothing', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const before = recorder.dialogs.length;

  assert.equal(await clientRow(page, MARKUP).locator('td.name').textContent(), MARKUP);
  assert.equal((await rows(page, `#spend-client tbody tr[data-client="${MARKUP}"]`))[0][0], MARKUP);
  const label = page.locator('#chart-client svg text title', { hasText: MARKUP });
  assert.equal(await label.count(), 1);
  await page.waitForTimeout(300); // an onerror handler would have run by now
  assert.equal(await page.locator('img, iframe, object, embed').count(), 0, 'no element made from the name');
  assert.equal(recorder.dialogs.length, before, 'no dialog');
  assert.equal(await page.evaluate(() => document.querySelectorAll('[onerror]').length), 0);
  await context.close();
});

test('Disable in the page makes the key fail on the API within 2 s; Enable restores it', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const key = keys['team-a'];
  await run(key, { model: 'model-a' });

  const row = clientRow(page, 'team-a');
  const clicked = Date.now();
  await row.getByRole('button', { name: 'Disable' }).click();
  while ((await chat(iris.origin, key, { model: 'model-a' })).status !== 401) {
    assert.ok(Date.now() - clicked < 2_000, 'the key still works 2 s after Disable');
    await new Promise((r) => setTimeout(r, 50));
  }
  const disabledAfter = Date.now() - clicked;
  await row.getByRole('button', { name: 'Enable' }).waitFor();
  assert.match(await row.locator('td.name').textContent(), /\(disabled\)/);

  const enabled = Date.now();
  await row.getByRole('button', { name: 'Enable' }).click();
  while ((await chat(iris.origin, key, { model: 'model-a' })).status !== 200) {
    assert.ok(Date.now() - enabled < 2_000, 'the key still fails 2 s after Enable');
    await new Promise((r) => setTimeout(r, 50));
  }
  await row.getByRole('button', { name: 'Disable' }).waitFor();
  console.log(`# disabled after ${disabledAfter} ms, enabled after ${Date.now() - enabled} ms`);
  await context.close();
});

test('Rotate shows a new key, once, that works; the old one stops', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const old = keys['team-b'];

  await clientRow(page, 'team-b').getByRole('button', { name: 'Rotate' }).click();
  await page.waitForSelector('#new-key', { state: 'visible' });
  assert.equal(await page.textContent('#new-key-client'), 'team-b');
  const fresh = await page.textContent('#new-key-value');
  assert.match(fresh, /^iris-[0-9a-f]{32,}$/);
  assert.notEqual(fresh, old);
  assert.equal((await chat(iris.origin, fresh, { model: 'model-b' })).status, 200);
  assert.equal((await chat(iris.origin, old, { model: 'model-b' })).status, 401, 'grace 0: the old key is gone');

  await page.click('#copy-key');
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), fresh);
  await page.click('#dismiss-key');
  assert.equal(await page.isVisible('#new-key'), false);
  assert.ok(!(await page.evaluate(() => document.body.innerText)).includes(fresh), 'shown only until Done');
  await context.close();
});

test('create shows the key once; Delete removes the client; API errors show as their message', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);

  // An error from the API, shown as its message.
  await page.fill('#create-form input[name=name]', 'team-c');
  await page.fill('#create-form input[name=models]', 'no-such-model');
  await page.click('#create-form button[type=submit]');
  await page.waitForFunction(() => document.getElementById('error').textContent !== '');
  const refused = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/clients', { name: 'team-c', models: ['no-such-model'] });
  assert.equal(refused.status, 400);
  assert.equal(await page.textContent('#error'), refused.json.error.message);
  assert.equal(await clientRow(page, 'team-c').count(), 0);

  await page.fill('#create-form input[name=models]', '');
  await page.fill('#create-form input[name=tokens_per_day]', '20000');
  await page.click('#create-form button[type=submit]');
  await clientRow(page, 'team-c').waitFor();
  assert.equal(await page.textContent('#error'), '', 'the error is gone once an action succeeds');
  assert.equal(await page.textContent('#new-key-client'), 'team-c');
  const key = await page.textContent('#new-key-value');
  assert.equal((await chat(iris.origin, key, { model: 'model-a' })).status, 200);
  assert.equal(await clientRow(page, 'team-c').locator('.window .figures').textContent(), '0 / 20,000');

  const dialogs = recorder.dialogs.length;
  await clientRow(page, 'team-c').getByRole('button', { name: 'Delete' }).click();
  await clientRow(page, 'team-c').waitFor({ state: 'detached' });
  assert.deepEqual(recorder.dialogs.slice(dialogs), ['Delete team-c? Its key stops working.']);
  assert.equal((await chat(iris.origin, key, { model: 'model-a' })).status, 401);

  // Config clients' buttons are there, disabled, with the reason.
  const alpha = clientRow(page, 'alpha');
  for (const name of ['Disable', 'Rotate', 'Delete']) {
    assert.equal(await alpha.getByRole('button', { name }).isDisabled(), true, name);
  }
  assert.match(await alpha.textContent(), /Defined in the config file/);
  await context.close();
});

test('the key is kept in the tab only: not in localStorage, cookies or any URL', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  await page.click('#refresh');
  await page.waitForLoadState('networkidle');

  assert.equal(await page.evaluate(() => localStorage.length), 0);
  assert.deepEqual(await context.cookies(), []);
  assert.equal(await page.evaluate(() => document.cookie), '');
  assert.ok(!page.url().includes(ADMIN_KEY));
  for (const url of recorder.requests) assert.ok(!url.includes(ADMIN_KEY), url);

  // Log out forgets it, and what was shown with it.
  await page.click('#logout');
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  assert.equal(await page.isVisible('#app'), false);
  assert.equal(await page.locator('#app tbody tr').count(), 0);
  await context.close();
});

test('a key\'s expiry and networks show in its row', async () => {
  const contractor = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/clients', {
    name: 'contractor',
    expires_at: '2020-01-01T01:00:00+01:00',
    allowed_networks: ['10.0.0.0/8', '2001:db8::/32'],
  });
  assert.equal(contractor.status, 201, JSON.stringify(contractor.json));
  const expired = await chat(iris.origin, contractor.json.key, { model: 'model-a' });
  assert.equal(expired.status, 401);
  assert.equal(JSON.parse(expired.text).error.code, 'key_expired');
  const batch = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/clients', {
    name: 'batch',
    expires_at: '2999-01-01T00:00:00Z',
  });
  assert.equal(batch.status, 201, JSON.stringify(batch.json));

  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const cell = clientRow(page, 'contractor').locator('td.source');
  assert.match(await cell.textContent(), /expired /);
  assert.match(await cell.textContent(), /only from 10\.0\.0\.0\/8, 2001:db8::\/32/);
  assert.equal(await cell.locator('.expired time').getAttribute('datetime'), '2020-01-01T00:00:00.000Z');
  const later = clientRow(page, 'batch').locator('td.source');
  assert.match(await later.textContent(), /expires /);
  assert.doesNotMatch(await later.textContent(), /expired|only from/);
  assert.equal(await later.locator('time').last().getAttribute('datetime'), '2999-01-01T00:00:00.000Z');
  assert.doesNotMatch(await clientRow(page, 'alpha').locator('td.source').textContent(), /expire|only from/);
  await context.close();
});

test('at phone width nothing overflows the body, and the charts are drawn', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin, { width: 375, height: 740 });
  await logIn(page, ADMIN_KEY);
  const sizes = await page.evaluate(() => ({
    document: document.documentElement.scrollWidth,
    body: document.body.scrollWidth,
    viewport: window.innerWidth,
  }));
  assert.ok(sizes.document <= sizes.viewport && sizes.body <= sizes.viewport, JSON.stringify(sizes));
  for (const chart of ['#chart-client', '#chart-model', '#chart-days']) {
    const box = await page.locator(`${chart} svg`).boundingBox();
    assert.ok(box && box.width > 100 && box.width <= 375 && box.height > 40, `${chart}: ${JSON.stringify(box)}`);
  }
  // Every client's buttons are reachable without scrolling sideways.
  const button = await clientRow(page, 'team-a').getByRole('button', { name: 'Rotate' }).boundingBox();
  assert.ok(button.x >= 0 && button.x + button.width <= 375, JSON.stringify(button));
  await context.close();
});

test('no request left Iris\'s origin, and no page broke its policy or threw', () => {
  assert.ok(recorder.requests.length > 20, `${recorder.requests.length} requests recorded`);
  const elsewhere = recorder.requests.filter((url) => new URL(url).origin !== iris.origin);
  assert.deepEqual(elsewhere, []);
  const paths = new Set(recorder.requests.map((url) => new URL(url).pathname));
  for (const path of paths) assert.match(path, /^\/admin\//, path);
  assert.deepEqual(recorder.problems, []);
});
