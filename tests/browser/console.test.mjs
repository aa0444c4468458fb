// The operator console in a real browser: Playwright (playwright-core, from
// the npm registry) driving Debian's Chromium. Run by tests/it/browser.rs,
// which starts the service, seeds it and passes:
//   CONSOLE_URL   the service's base URL
//   ADMIN_KEY     its admin key
//   HOSTILE_ID    a processed event whose dados hold markup
//   PARTNER_ID    a partner (with a key) to rotate
//   DEAD_COUNT    dead letters of type REGRA, category rejected
//   CHROMIUM      the browser binary
//   SCREENSHOT_DIR  where to save a screenshot of each page (optional)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const base = process.env.CONSOLE_URL;
const adminKey = process.env.ADMIN_KEY;
const shots = process.env.SCREENSHOT_DIR;

let browser;
/** Every request any page made, and every CSP or script error. */
const requests = [];
const problems = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
});

async function newPage(viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on('request', (r) => requests.push(r.url()));
  // A refused sign-in answers 401, which Chromium reports as a console
  // error; anything else is a problem (CSP refusals say "Refused to …").
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 401/.test(m.text())) problems.push(m.text());
  });
  page.on('requestfailed', (r) => problems.push(`${r.url()}: ${r.failure()?.errorText}`));
  page.on('pageerror', (e) => problems.push(String(e)));
  return page;
}

async function signIn(page, next = '/console/') {
  await page.goto(base + next);
  await page.getByLabel('Admin key', { exact: true }).fill(adminKey);
  await page.getByRole('button', { name: 'Sign in' }).first().click();
  await page.waitForURL((u) => !u.pathname.startsWith('/console/signin'));
}

async function shot(page, name) {
  if (shots) await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

test('sign-in: a wrong key is refused, the admin key opens the page asked for', async () => {
  const page = await newPage();
  await page.goto(base + '/console/events');
  assert.match(new URL(page.url()).pathname, /^\/console\/signin/);
  await shot(page, 'signin');
  await page.getByLabel('Admin key', { exact: true }).fill('not-the-admin-key-000');
  await page.getByRole('button', { name: 'Sign in' }).first().click();
  await page.getByText('That is not the admin key.').waitFor();
  assert.ok(!page.url().includes('not-the-admin-key'), 'the key is never in a URL');
  await page.getByLabel('Admin key', { exact: true }).fill(adminKey);
  await page.getByRole('button', { name: 'Sign in' }).first().click();
  await page.waitForURL(base + '/console/events');
  assert.ok(!page.url().includes(adminKey));
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === 'orch_console');
  assert.ok(session, 'a session cookie');
  assert.equal(session.httpOnly, true);
  assert.equal(session.sameSite, 'Strict');
  // Signing out ends it.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await page.waitForURL(/\/console\/signin/);
  await page.goto(base + '/console/partners');
  assert.match(new URL(page.url()).pathname, /^\/console\/signin/);
  await page.context().close();
});

test('overview: chart, counts, queues, dead letters, destinations', async () => {
  const page = await newPage();
  await signIn(page);
  await page.getByRole('heading', { name: 'Events per second by type, last hour' }).waitFor();
  assert.ok((await page.locator('svg polyline').count()) >= 1, 'a line per type with events');
  const legend = await page.locator('.legend').innerText();
  assert.match(legend, /REGRA: \d+ events/);
  assert.match(await page.locator('#queues + .scroll').innerText(), /VENDA/);
  assert.match(await page.locator('section', { has: page.locator('#dead') }).innerText(), /REGRA\s+rejected\s+\d+/);
  await page.getByRole('heading', { name: 'Destinations' }).waitFor();
  await shot(page, 'overview');
  await page.context().close();
});

test('events: find one by id, open it; its payload shows as text', async () => {
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Events', exact: true }).click();
  await page.waitForURL(base + '/console/events');
  await shot(page, 'events');
  await page.getByLabel('Event id', { exact: true }).fill(process.env.HOSTILE_ID);
  await page.getByLabel('Event id', { exact: true }).press('Enter');
  await page.waitForURL(base + '/console/events/' + process.env.HOSTILE_ID);
  await page.getByRole('heading', { name: /Event/ }).first().waitFor();
  const dados = await page.locator('pre.json').first().textContent();
  assert.ok(dados.includes('<script>window.pwned=1</script>'), dados);
  assert.ok(dados.includes('"><img src=x onerror=window.pwned=2>'), dados);
  assert.equal(await page.evaluate(() => window.pwned), undefined, 'no payload ran');
  assert.equal(await page.locator('main img').count(), 0, 'no payload became an element');
  await page.getByRole('heading', { name: 'Attempts' }).waitFor();
  assert.match(await page.locator('.timeline').innerText(), /Attempt 1/);
  assert.match(await page.locator('.timeline').innerText(), /enrich \(script\)/);
  await shot(page, 'event');
  // Filters: dead letters of REGRA.
  await page.goto(base + '/console/events');
  await page.getByLabel('Status', { exact: true }).selectOption('dead_lettered');
  await page.getByLabel('Type', { exact: true }).selectOption('REGRA');
  await page.getByRole('button', { name: 'Filter' }).click();
  await page.waitForURL(/status=dead_lettered/);
  const rows = await page.locator('table.events tbody tr').count();
  assert.equal(rows, Number(process.env.DEAD_COUNT));
  await page.context().close();
});

test('dead letters: a dry run counts, the confirmation redrives', async () => {
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Dead letters', exact: true }).click();
  await shot(page, 'dead-letters');
  await page.getByRole('button', { name: 'Dry run: redrive REGRA rejected' }).click();
  const count = process.env.DEAD_COUNT;
  await page.getByText(`${count} dead letters would be redriven`).waitFor();
  await shot(page, 'dead-letters-dry-run');
  const before = await fetchJson(`/events?status=dead_lettered&tipo=REGRA`);
  assert.equal(before.items.length, Number(count), 'the dry run changed nothing');
  await page.getByRole('button', { name: `Redrive ${count} dead letters` }).click();
  await page.getByText(`${count} dead letters are back in the queue`).waitFor();
  // They run again (and, the script still rejecting them, dead-letter again).
  await waitFor(async () => {
    const again = await fetchJson(`/events?status=dead_lettered&tipo=REGRA`);
    return again.items.length === Number(count) && again.items.every((e) => e.attempts === 2);
  });
  await page.context().close();
});

test('pipelines: the playground shows each stage; bad JSON is said', async () => {
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Pipelines' }).click();
  await page.getByLabel('Type', { exact: true }).selectOption('VENDA');
  await page.getByLabel('dados (JSON)', { exact: true }).fill('{"produto_id": "P-7", "quantidade": 4, "valor": 2.5, "canal": "app"}');
  await page.getByRole('button', { name: 'Run' }).click();
  const result = page.locator('#pg-result');
  await result.waitFor();
  const text = await result.innerText();
  assert.match(text, /Outcome: processed/);
  assert.match(text, /enrich \(script\)\s+ok/);
  assert.match(text, /"total": 10\.0/);
  assert.match(text, /"comissao": 0\.5/);
  assert.equal(await page.getByLabel('dados (JSON)', { exact: true }).inputValue(),
    '{"produto_id": "P-7", "quantidade": 4, "valor": 2.5, "canal": "app"}', 'the input is kept');
  await shot(page, 'pipelines');
  await page.getByLabel('dados (JSON)', { exact: true }).fill('{"produto_id": ');
  await page.getByRole('button', { name: 'Run' }).click();
  await page.locator('#pg-problem').getByText('dados is not valid JSON').waitFor();
  await page.context().close();
});

test('partners: rotate a key; the new one is shown once and works', async () => {
  const page = await newPage();
  await signIn(page);
  await page.getByRole('link', { name: 'Partners' }).click();
  await page.getByRole('link', { name: process.env.PARTNER_ID, exact: true }).click();
  await shot(page, 'partner');
  await page.getByLabel('Revoke every other key now', { exact: true }).check();
  await page.getByRole('button', { name: 'Issue a new key' }).click();
  const key = await page.locator('#new-key-value').inputValue();
  assert.match(key, /^eo_[0-9a-f]{40}$/);
  const sent = await fetch(base + '/events', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': key },
    body: JSON.stringify({ tipo: 'REGRA', dados: { n: 0 } }),
  });
  assert.equal(sent.status, 202);
  // Shown once: the partner's page again has no key on it (reloading the
  // action's address goes to the page, it does not act again).
  await page.goto(page.url());
  await page.waitForURL(base + '/console/partners/' + process.env.PARTNER_ID);
  assert.equal(await page.locator('#new-key-value').count(), 0);
  assert.ok(!(await page.content()).includes(key));
  await page.goto(base + '/console/partners');
  await shot(page, 'partners');
  await page.context().close();
});

test('keyboard only: skip link, navigation, a form', async () => {
  const page = await newPage();
  await page.goto(base + '/console/');
  // The key field has the focus on the sign-in page.
  await page.waitForFunction(() => document.activeElement?.id === 'admin_key');
  await page.keyboard.type(adminKey);
  await page.keyboard.press('Enter');
  try {
    await page.waitForURL(base + '/console/', { timeout: 10000 });
  } catch {
    assert.fail(`signing in by keyboard failed: ${await page.locator('main').innerText()}`);
  }
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');
  // Tab to "Events" in the navigation and follow it.
  for (let i = 0; i < 10; i++) {
    await page.keyboard.press('Tab');
    if ((await page.evaluate(() => document.activeElement.textContent)) === 'Events') break;
  }
  await page.keyboard.press('Enter');
  await page.waitForURL(base + '/console/events');
  await page.getByLabel('Event id', { exact: true }).focus();
  await page.keyboard.type(process.env.HOSTILE_ID);
  await page.keyboard.press('Enter');
  await page.waitForURL(base + '/console/events/' + process.env.HOSTILE_ID);
  await page.context().close();
});

test('390 px wide: every page fits, tables scroll inside', async () => {
  const page = await newPage({ width: 390, height: 844 });
  await signIn(page);
  for (const [path, name] of [
    ['/console/', 'overview'], ['/console/events', 'events'],
    ['/console/events/' + process.env.HOSTILE_ID, 'event'], ['/console/dead-letters', 'dead-letters'],
    ['/console/pipelines', 'pipelines'], ['/console/partners', 'partners'],
  ]) {
    await page.goto(base + path);
    const wide = await page.evaluate(() => {
      const out = [];
      for (const el of document.querySelectorAll('body *')) {
        if (el.parentElement?.closest('.scroll')) continue;
        const r = el.getBoundingClientRect();
        if (r.right > 391) out.push(`${el.tagName.toLowerCase()}.${el.className} ${Math.round(r.right)}px`);
      }
      return out;
    });
    assert.deepEqual(wide, [], `${path}: elements wider than the screen`);
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `${path} is ${width} px wide`);
    await shot(page, `mobile-${name}`);
  }
  await page.context().close();
});

test('no page loaded anything from another host, and nothing broke', () => {
  const foreign = requests.filter((u) => !u.startsWith(base));
  assert.deepEqual(foreign, []);
  assert.deepEqual(problems, []);
});

async function fetchJson(path) {
  const resp = await fetch(base + path, { headers: { 'x-api-key': adminKey } });
  assert.equal(resp.status, 200, path);
  return resp.json();
}

async function waitFor(check, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail('timed out');
}
