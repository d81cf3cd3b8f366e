// Managing teams from the console, in headless Chromium: create a team with
// a cost limit, put a client in it, change its budget, delete it (refused
// while it has a member); config teams have no buttons; a team named like
// markup is text everywhere. Each step is checked against the admin API.
//
// One Iris for the file; the tests run in order and build on each other.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { admin, chat, launchBrowser, startIris, startMockUpstream } from './harness.mjs';
import { Recorder, clientRow, logIn, openConsole, rows, teamRow } from './page.mjs';

const ADMIN_KEY = 'iris-admin-browser-test';
const MARKUP = '<img src=x onerror=alert(1)>';
// model-b is priced per million tokens; the mock reports this usage:
// 1000 * 2.50 + 250 * 10.00 = 5000 per million, 0.005.
const MODELS = [{ name: 'model-a' }, { name: 'model-b', price: { input: 2.5, output: 10 } }];
const USAGE = { 'x-mock-usage': JSON.stringify({ prompt_tokens: 1000, completion_tokens: 250, total_tokens: 1250 }) };

let upstream;
let iris;
let browser;
const recorder = new Recorder();
let botKey;

before(async () => {
  upstream = await startMockUpstream();
  iris = await startIris({
    upstreamURL: upstream.baseURL,
    adminKey: ADMIN_KEY,
    models: MODELS,
    clients: [{ name: 'markup-member', key: 'iris-markup-member-key', team: MARKUP }],
    teams: [{ name: MARKUP, budget: { tokens_per_day: 10_000 } }],
  });
  browser = await launchBrowser();
});

after(async () => {
  if (process.env.IRIS_BROWSER_SHOW_LOG && iris) console.error(iris.log());
  await browser?.close();
  await iris?.stop();
  await upstream?.stop();
});

const teams = async () => (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/teams')).json.data;

/** Waits for the page's error line and answers it. */
async function errorShown(page) {
  await page.waitForFunction(() => document.getElementById('error').textContent !== '');
  return page.textContent('#error');
}

test('Create team: an API error shows as its message naming the field; a team with a cost limit shows with its cost bar', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const form = page.locator('#team-form');
  // The currency of the API's amounts beside each money field.
  assert.deepEqual(await form.locator('label', { has: page.locator('input[name^=cost_]') }).allTextContents(), ['Cost per day (USD)', 'Cost per month (USD)']);

  // A limit of 0: the API refuses it, naming the field; nothing is created.
  await form.locator('input[name=name]').fill('ops');
  await form.locator('input[name=cost_per_day]').fill('0');
  await form.getByRole('button', { name: 'Create team' }).click();
  const refused = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/teams', { name: 'ops', budget: { cost_per_day: 0 } });
  assert.equal(refused.status, 400);
  assert.equal(refused.json.error.param, 'budget.cost_per_day');
  assert.equal(await errorShown(page), refused.json.error.message);
  assert.match(refused.json.error.message, /budget\.cost_per_day/);
  assert.equal(await teamRow(page, 'ops').count(), 0);

  await form.locator('input[name=name]').fill('ops');
  await form.locator('input[name=cost_per_day]').fill('2.5');
  await form.locator('input[name=tokens_per_month]').fill('100000');
  await form.getByRole('button', { name: 'Create team' }).click();
  await teamRow(page, 'ops').waitFor();
  assert.equal(await page.textContent('#error'), '', 'the error is gone once an action succeeds');
  assert.equal(await form.locator('input[name=name]').inputValue(), '', 'the form is cleared');

  // Its name again: 409 team_exists, shown as its message.
  await form.locator('input[name=name]').fill('ops');
  await form.getByRole('button', { name: 'Create team' }).click();
  const exists = await admin(iris.origin, ADMIN_KEY, 'POST', '/admin/teams', { name: 'ops' });
  assert.equal(exists.status, 409);
  assert.equal(exists.json.error.code, 'team_exists');
  assert.equal(await errorShown(page), exists.json.error.message);

  const ops = (await teams()).find((t) => t.name === 'ops');
  assert.equal(ops.source, 'managed');
  assert.equal(ops.usage.cost_per_day.limit, 2.5);
  assert.equal(ops.usage.tokens_per_month.limit, 100_000);
  assert.equal(ops.usage.cost_per_month?.limit ?? null, null, 'a blank field sets no limit');
  const cost = teamRow(page, 'ops').locator('.window', { hasText: 'cost per day' });
  assert.equal(await cost.locator('.figures').textContent(), '0.00 / 2.50 USD');
  assert.equal(await cost.locator('.bar').getAttribute('aria-valuemax'), '2.5');
  const tokens = teamRow(page, 'ops').locator('.window', { hasText: 'tokens per month' });
  assert.equal(await tokens.locator('.figures').textContent(), '0 / 100,000');
  assert.equal(await teamRow(page, 'ops').locator('.window').count(), 2, 'a bar per limit');
  assert.equal(await teamRow(page, 'ops').locator('td.members').textContent(), 'no clients');
  await context.close();
});

test('a client created in the team names it in its row, is its member, and its spend fills the team\'s cost bar', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const select = page.locator('#create-form select[name=team]');
  assert.deepEqual(await select.locator('option').allTextContents(), ['(no team)', MARKUP, 'ops']);
  await page.fill('#create-form input[name=name]', 'ops-bot');
  assert.match(await page.textContent('#create-form'), /Cost per day \(USD\)/, 'the money fields carry the currency');
  await page.fill('#create-form input[name=cost_per_day]', '1.5');
  await select.selectOption('ops');
  await page.click('#create-form button[type=submit]');
  await clientRow(page, 'ops-bot').waitFor();
  botKey = await page.textContent('#new-key-value');
  assert.equal(await clientRow(page, 'ops-bot').locator('td.team').textContent(), 'ops');
  assert.equal(await teamRow(page, 'ops').locator('td.members').textContent(), 'ops-bot', 'the teams table is reloaded too');
  const listed = (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/clients')).json.data;
  assert.equal(listed.find((c) => c.name === 'ops-bot').team, 'ops');
  assert.equal(listed.find((c) => c.name === 'ops-bot').budget.cost_per_day, 1.5, 'its cost limit, from the form');

  // Its request is counted against the team: the cost bar moves.
  const answer = await chat(iris.origin, botKey, { model: 'model-b', headers: USAGE });
  assert.equal(answer.status, 200, answer.text);
  await page.click('#refresh');
  const cost = teamRow(page, 'ops').locator('.window', { hasText: 'cost per day' });
  await page.waitForFunction(() => [...document.querySelectorAll('#teams-table tr[data-team="ops"] .window')].some((w) => w.textContent.includes('cost per day') && w.querySelector('.figures').textContent === '0.005 / 2.50 USD'));
  assert.equal(await cost.locator('.bar').getAttribute('aria-valuenow'), '0.005');
  await context.close();
});

test('Edit budget changes a managed team\'s limits: refused values show the API\'s message, a blank field removes a limit', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const row = teamRow(page, 'ops');
  const form = row.locator('form.edit-budget');
  assert.equal(await form.isVisible(), false);
  await row.getByRole('button', { name: 'Edit budget' }).click();
  assert.equal(await form.isVisible(), true);
  assert.equal(await form.locator('input[name=cost_per_day]').inputValue(), '2.5', 'filled with the limits now');
  assert.equal(await form.locator('input[name=tokens_per_month]').inputValue(), '100000');
  assert.equal(await form.locator('input[name=cost_per_month]').inputValue(), '');

  await form.locator('input[name=cost_per_day]').fill('0');
  await form.locator('input[name=tokens_per_day]').fill('5000');
  await form.getByRole('button', { name: 'Save' }).click();
  const refused = await admin(iris.origin, ADMIN_KEY, 'PATCH', '/admin/teams/ops', { budget: { cost_per_day: 0, tokens_per_day: 5000 } });
  assert.equal(refused.status, 400);
  assert.equal(refused.json.error.param, 'budget.cost_per_day');
  assert.equal(await errorShown(page), refused.json.error.message);
  const unchanged = (await teams()).find((t) => t.name === 'ops').usage;
  assert.deepEqual([unchanged.cost_per_day.limit, unchanged.tokens_per_day?.limit ?? null], [2.5, null], 'nothing written');

  await form.locator('input[name=tokens_per_day]').fill('');
  await form.locator('input[name=cost_per_day]').fill('4');
  await form.locator('input[name=cost_per_month]').fill('30');
  await form.locator('input[name=tokens_per_month]').fill('');
  await form.getByRole('button', { name: 'Save' }).click();
  await page.waitForFunction(() => document.querySelector('#teams-table tr[data-team="ops"] .figures')?.textContent.endsWith('/ 4.00 USD'));
  assert.equal(await page.textContent('#error'), '');
  const ops = (await teams()).find((t) => t.name === 'ops');
  assert.deepEqual(
    [ops.usage.cost_per_day.limit, ops.usage.cost_per_month.limit, ops.usage.tokens_per_month?.limit ?? null, ops.usage.tokens_per_day?.limit ?? null],
    [4, 30, null, null],
  );
  const shown = await row.locator('.window .figures').allTextContents();
  const money = (n) => new Intl.NumberFormat('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 6 }).format(n);
  assert.equal(ops.usage.cost_per_day.used, 0.005, 'the day\'s spend kept');
  assert.deepEqual(shown, [`0.005 / 4.00 USD`, `${money(ops.usage.cost_per_month.used)} / 30.00 USD`], 'the tokens limit gone');
  await context.close();
});

test('Delete is refused while the team has a member (the message names it), and works once it is empty', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const dialogs = recorder.dialogs.length;
  await teamRow(page, 'ops').getByRole('button', { name: 'Delete' }).click();
  const message = await errorShown(page);
  const refused = await admin(iris.origin, ADMIN_KEY, 'DELETE', '/admin/teams/ops');
  assert.equal(refused.status, 409);
  assert.equal(refused.json.error.code, 'team_not_empty');
  assert.equal(message, refused.json.error.message);
  assert.match(message, /ops-bot/);
  assert.deepEqual(recorder.dialogs.slice(dialogs), ['Delete ops? Its budget is gone.']);
  assert.equal(await teamRow(page, 'ops').count(), 1);

  // The member deleted in its row, the team is empty, then deleted.
  await clientRow(page, 'ops-bot').getByRole('button', { name: 'Delete' }).click();
  await clientRow(page, 'ops-bot').waitFor({ state: 'detached' });
  assert.equal(await teamRow(page, 'ops').locator('td.members').textContent(), 'no clients');
  await teamRow(page, 'ops').getByRole('button', { name: 'Delete' }).click();
  await teamRow(page, 'ops').waitFor({ state: 'detached' });
  assert.equal(await page.textContent('#error'), '');
  assert.deepEqual((await teams()).map((t) => t.name), [MARKUP]);
  assert.deepEqual(await page.locator('#create-form select[name=team] option').allTextContents(), ['(no team)', MARKUP], 'no longer offered to clients');
  assert.equal((await chat(iris.origin, botKey, { model: 'model-a' })).status, 401);
  await context.close();
});

test('a config team has no buttons; a team named like markup is text everywhere, and clients can be put in it', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);
  const before = recorder.dialogs.length;
  const row = teamRow(page, MARKUP);
  assert.equal(await row.locator('td.name').textContent(), MARKUP);
  assert.equal(await row.locator('button, form').count(), 0, 'config teams: no buttons');
  assert.deepEqual((await rows(page, '#teams-table tbody tr'))[0].slice(1, 3), ['config', 'markup-member']);
  assert.equal(await clientRow(page, 'markup-member').locator('td.team').textContent(), MARKUP);

  // Chosen in the client form, the exact name goes to the API.
  await page.fill('#create-form input[name=name]', 'markup-bot');
  await page.locator('#create-form select[name=team]').selectOption({ label: MARKUP });
  await page.click('#create-form button[type=submit]');
  await clientRow(page, 'markup-bot').waitFor();
  assert.equal(await clientRow(page, 'markup-bot').locator('td.team').textContent(), MARKUP);
  const listed = (await admin(iris.origin, ADMIN_KEY, 'GET', '/admin/clients')).json.data;
  assert.equal(listed.find((c) => c.name === 'markup-bot').team, MARKUP);
  assert.equal(await row.locator('td.members').textContent(), 'markup-member, markup-bot');

  await page.waitForTimeout(300); // an onerror handler would have run by now
  assert.equal(await page.locator('img, iframe, object, embed').count(), 0, 'no element made from the name');
  assert.equal(await page.evaluate(() => document.querySelectorAll('[onerror]').length), 0);
  assert.equal(recorder.dialogs.length, before, 'no dialog');
  await context.close();
});

test('no request left Iris\'s origin, and no page broke its policy or threw', () => {
  assert.ok(recorder.requests.length > 20, `${recorder.requests.length} requests recorded`);
  const elsewhere = recorder.requests.filter((url) => new URL(url).origin !== iris.origin);
  assert.deepEqual(elsewhere, []);
  assert.deepEqual(recorder.problems, []);
});
