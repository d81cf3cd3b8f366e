// The console of an Iris that has served nothing yet: every view says what
// to do instead of showing empty tables; and the admin API's failed-auth
// throttle reaches the page's login.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { admin, launchBrowser, startIris, startMockUpstream } from './harness.mjs';
import { Recorder, logIn, openConsole, submitKey } from './page.mjs';

const ADMIN_KEY = 'iris-admin-browser-test';

let upstream;
let iris;
let browser;
const recorder = new Recorder();

before(async () => {
  upstream = await startMockUpstream();
  iris = await startIris({
    upstreamURL: upstream.baseURL,
    adminKey: ADMIN_KEY,
    models: [{ name: 'model-a' }],
    clients: [{ name: 'only', key: 'iris-only-key' }],
  });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await iris?.stop();
  await upstream?.stop();
});

test('with no spend and no managed clients, each view says what to do', async () => {
  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await logIn(page, ADMIN_KEY);

  const spendEmpty = page.locator('#spend-empty');
  assert.equal(await spendEmpty.isVisible(), true);
  assert.match(await spendEmpty.textContent(), /No spend in this period yet/);
  assert.equal(await page.isVisible('#spend-data'), false, 'no empty tables or charts');
  assert.equal(await page.locator('#chart-client svg, #chart-model svg').count(), 0);

  const managedEmpty = page.locator('#managed-empty');
  assert.equal(await managedEmpty.isVisible(), true);
  assert.match(await managedEmpty.textContent(), /No managed clients yet: create one/);
  assert.equal(await page.isVisible('#clients-empty'), false, 'the config client is listed');
  assert.equal(await page.locator('#clients-table tbody tr').count(), 1);

  const teamsEmpty = page.locator('#teams-empty');
  await teamsEmpty.waitFor();
  assert.match(await teamsEmpty.textContent(), /No teams yet/);
  assert.equal(await page.isVisible('#teams-table'), false, 'no empty table');

  const daysEmpty = page.locator('#days-empty');
  assert.equal(await daysEmpty.isVisible(), true);
  assert.match(await daysEmpty.textContent(), /Nothing in the last 30 days/);
  const box = await page.locator('#chart-days svg').boundingBox();
  assert.ok(box && box.width > 100 && box.height > 40, 'the 30 days are drawn, empty');

  assert.equal(await page.isVisible('#upstreams-empty'), false);
  assert.equal(await page.textContent('#error'), '');
  assert.deepEqual(recorder.problems, []);
  await context.close();
});

test('after a burst of wrong keys the login shows the throttle\'s message; the right key still works', async () => {
  // The burst from this address, spent through the API (as a guesser would).
  let answer;
  for (let i = 0; i < 25; i++) {
    answer = await admin(iris.origin, `iris-wrong-${i}`, 'GET', '/admin/clients');
    if (answer.status === 429) break;
  }
  assert.equal(answer.status, 429, 'the admin API throttles wrong keys');

  const { context, page } = await openConsole(browser, recorder, iris.origin);
  await submitKey(page, 'iris-one-more-guess');
  await page.waitForFunction(() => document.getElementById('login-error').textContent !== '');
  assert.equal(await page.textContent('#login-error'), answer.json.error.message);
  assert.equal(await page.isVisible('#app'), false);

  await logIn(page, ADMIN_KEY);
  assert.equal(await page.textContent('#login-error'), '');
  assert.equal(await page.locator('#clients-table tbody tr').count(), 1);
  await context.close();

  const elsewhere = recorder.requests.filter((url) => new URL(url).origin !== iris.origin);
  assert.deepEqual(elsewhere, []);
});
