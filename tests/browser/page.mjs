// What the console tests do with a page: open it in a context of its own
// (viewport, locale and time zone fixed, so numbers and times are known),
// recording every request it makes, every dialog, CSP violation and script
// error; log in; read its tables back as text.

/** Everything the pages of one test file did that must not happen, and every request. */
export class Recorder {
  constructor() {
    this.requests = [];
    this.dialogs = [];
    this.problems = [];
  }

  watch(context) {
    context.on('request', (request) => this.requests.push(request.url()));
    context.on('page', (page) => this.watchPage(page));
  }

  watchPage(page) {
    page.on('dialog', (dialog) => {
      this.dialogs.push(dialog.message());
      // Only the console's own Delete confirmation is answered yes.
      if (dialog.type() === 'confirm' && dialog.message().startsWith('Delete ')) dialog.accept();
      else dialog.dismiss();
    });
    page.on('pageerror', (error) => this.problems.push(`script error: ${error.message}`));
    page.on('console', (message) => {
      if (/Content Security Policy|Refused to/i.test(message.text())) {
        this.problems.push(`console: ${message.text()}`);
      }
    });
  }
}

/**
 * A new context and page on `origin`'s console. `en-US` numbers, the
 * Asia/Kolkata zone (UTC+5:30, so local and UTC times always differ).
 */
export async function openConsole(browser, recorder, origin, { width = 1280, height = 900 } = {}) {
  const context = await browser.newContext({
    viewport: { width, height },
    locale: 'en-US',
    timezoneId: 'Asia/Kolkata',
  });
  recorder.watch(context);
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
  const page = await context.newPage();
  const response = await page.goto(origin + '/admin/ui');
  return { context, page, response };
}

/** Submits `key` in the login form. */
export async function submitKey(page, key) {
  await page.fill('#admin-key', key);
  await page.click('#login-form button[type=submit]');
}

/** Logs in and waits until every view has its data. */
export async function logIn(page, key) {
  await submitKey(page, key);
  await page.waitForSelector('#app', { state: 'visible' });
  await page.waitForSelector('#chart-days svg');
  await page.waitForSelector('#upstreams-table tbody tr, #upstreams-empty:not([hidden])');
  await page.waitForSelector('#teams-table tbody tr, #teams-empty:not([hidden])');
}

/** A table's body rows as arrays of cell texts. */
export function rows(page, selector) {
  return page.$$eval(selector, (trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent.trim())));
}

/** The row of the clients table for `name` (a JSON string is a valid CSS string). */
export function clientRow(page, name) {
  return page.locator(`#clients-table tbody tr[data-client=${JSON.stringify(name)}]`);
}

/** The row of the teams table for `name`. */
export function teamRow(page, name) {
  return page.locator(`#teams-table tbody tr[data-team=${JSON.stringify(name)}]`);
}
