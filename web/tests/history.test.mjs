// End-to-end: infinite scroll back through history (`history` with `before`).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  ChatServer, launchBrowser, openPage, signIn, joinRoom, messageList, seqs, bodies,
  assertContiguous, eventually, screenshot,
} from './lib/harness.mjs';

const TOTAL = 130;

describe('history', () => {
  let server, browser;

  before(async () => {
    server = await new ChatServer({ name: 'history' }).start();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('scrolling up loads older pages', async () => {
    // Seed the room through the client module itself, from a page of the app's origin.
    const seeder = await openPage(browser, server);
    const seeded = await seeder.evaluate(async (total) => {
      const { ChatClient } = await import('/chat-client.js');
      const c = new ChatClient({ user: 'seeder' });
      await c.connect();
      await c.join('archive');
      let last;
      for (let i = 1; i <= total; i++) last = await c.send('archive', `old message ${i}`);
      c.close();
      return last.seq;
    }, TOTAL);
    assert.equal(seeded, TOTAL);
    await seeder.context().close();

    const page = await openPage(browser, server, { viewport: { width: 1000, height: 700 } });
    await signIn(page, 'reader');
    await joinRoom(page, 'archive');
    const list = messageList(page);
    // The first page: the newest 50.
    await eventually(async () => (await list.count()) === 50, { message: 'first page of 50' });
    assertContiguous(await seqs(page), { from: TOTAL - 49, to: TOTAL });
    const log = page.getByRole('log');
    assert.ok(await log.evaluate((e) => e.scrollHeight > e.clientHeight), 'the log scrolls');
    assert.ok(await log.evaluate((e) => e.scrollHeight - e.scrollTop - e.clientHeight < 5), 'starts at the bottom');

    // Scroll up with the mouse wheel: the next page comes in, the view stays where it was.
    // (One wheel turn at a time, and only while the page has not come: a wheel turn during the
    // load must not fetch two pages.)
    await log.hover();
    await eventually(async () => {
      if ((await list.count()) >= 100) return true;
      await page.mouse.wheel(0, -4000);
      return false;
    }, { message: 'second page', interval: 500 });
    assertContiguous(await seqs(page), { from: TOTAL - 99, to: TOTAL });
    assert.ok(await log.evaluate((e) => e.scrollTop > 100), 'scroll position kept while prepending');
    await screenshot(page, 'history-scrolled');

    await eventually(async () => {
      if ((await list.count()) === TOTAL) return true;
      await page.mouse.wheel(0, -4000);
      return false;
    }, { message: 'all pages', interval: 500 });
    const all = assertContiguous(await seqs(page), { from: 1, to: TOTAL });
    assert.equal(all.length, TOTAL);
    const b = await bodies(page);
    assert.equal(b[0], 'old message 1');
    assert.equal(b[TOTAL - 1], `old message ${TOTAL}`);
    await page.getByText('This is the beginning of #archive.').waitFor();
    // The pages were asked for with `history` `before` = the oldest seq shown.
    const asked = page.wsSent.filter((f) => f.type === 'history').map((f) => f.before);
    assert.deepEqual(asked, [TOTAL + 1, TOTAL - 49, TOTAL - 99]);
  });

  it('"Load older messages" works from the keyboard too', async () => {
    const page = await openPage(browser, server);
    await signIn(page, 'keys');
    await joinRoom(page, 'archive');
    await eventually(async () => (await messageList(page).count()) === 50, { message: 'first page' });
    const button = page.getByRole('button', { name: 'Load older messages' });
    await button.focus();
    await page.keyboard.press('Enter');
    await eventually(async () => (await messageList(page).count()) >= 100, { message: 'older page by keyboard' });
    assertContiguous(await seqs(page), { to: TOTAL });
  });
});
