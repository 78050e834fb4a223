// End-to-end: two people chat through the real server in headless Chromium.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {
  ChatServer, launchBrowser, openPage, signIn, joinRoom, send, messageList, item, deliveryStatus, seqs, bodies,
  assertContiguous, eventually, screenshot, connected, SCREENSHOT_DIR,
} from './lib/harness.mjs';

describe('two people chatting', () => {
  let server, browser, alice, bob;

  before(async () => {
    server = await new ChatServer({ name: 'chat' }).start();
    browser = await launchBrowser();
    alice = await openPage(browser, server);
    bob = await openPage(browser, server);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('two pages chat in both directions', async () => {
    await signIn(alice, 'alice');
    await joinRoom(alice, 'general');
    await signIn(bob, 'bob');
    await joinRoom(bob, 'general');

    await send(alice, 'hi bob, are you there?');
    await item(bob, 'hi bob, are you there?').waitFor();
    await send(bob, 'hello alice! yes, here.', { key: true });
    await item(alice, 'hello alice! yes, here.').waitFor();
    await item(bob, 'hello alice! yes, here.').waitFor();

    // Sender and delivery state on own messages.
    const mine = item(alice, 'hi bob, are you there?');
    await deliveryStatus(alice, 'hi bob, are you there?', 'stored').waitFor();
    assert.match(await mine.locator('.sender').textContent(), /^alice$/);
    assert.equal(await item(bob, 'hi bob, are you there?').locator('.status').isVisible(), false, 'no delivery state on others\' messages');
    assert.match(await item(bob, 'hi bob, are you there?').locator('time').textContent(), /\d/);

    assert.deepEqual(await bodies(alice), ['hi bob, are you there?', 'hello alice! yes, here.']);
    assert.deepEqual(await bodies(bob), ['hi bob, are you there?', 'hello alice! yes, here.']);
    assertContiguous(await seqs(alice), { from: 1, to: 2 });
    assertContiguous(await seqs(bob), { from: 1, to: 2 });
  });

  it('presence and typing appear', async () => {
    const members = alice.getByRole('list', { name: 'Members' });
    await members.getByRole('listitem').filter({ hasText: 'bob' }).filter({ hasText: 'online' }).waitFor();
    await bob.getByRole('list', { name: 'Members' }).getByRole('listitem').filter({ hasText: 'alice' }).filter({ hasText: 'online' }).waitFor();

    // Bob types (real key presses in the Message box): Alice sees it.
    await bob.getByRole('textbox', { name: 'Message' }).pressSequentially('I am typ', { delay: 20 });
    await alice.getByText('bob is typing…').waitFor({ timeout: 10000 });
    await bob.getByRole('textbox', { name: 'Message' }).fill('');
    // It fades after a few seconds without typing.
    await alice.getByText('bob is typing…').waitFor({ state: 'hidden', timeout: 15000 });

    // A third person comes and goes: online, then offline.
    const carol = await openPage(browser, server);
    await signIn(carol, 'carol');
    await joinRoom(carol, 'general');
    await members.getByRole('listitem').filter({ hasText: 'carol' }).filter({ hasText: 'online' }).waitFor();
    await send(carol, 'hi both, the deploy is done. Release notes are in the wiki.');
    await item(alice, 'hi both, the deploy is done. Release notes are in the wiki.').waitFor();
    await carol.context().close();
    await members.getByRole('listitem').filter({ hasText: 'carol' }).filter({ hasText: 'offline' }).waitFor({ timeout: 15000 });

    // The main screen, for the docs: a conversation, members, someone typing.
    await send(alice, 'thanks carol! The new build looks good here.');
    await send(bob, 'Same here. I will run the load test after lunch.');
    await item(alice, 'Same here. I will run the load test after lunch.').waitFor();
    await bob.getByRole('textbox', { name: 'Message' }).pressSequentially('great, let', { delay: 20 });
    await alice.getByText('bob is typing…').waitFor({ timeout: 10000 });
    await screenshot(alice, 'main');
    await bob.getByRole('textbox', { name: 'Message' }).fill('');
  });

  it('keyboard: Enter sends, Shift+Enter makes a new line', async () => {
    const box = alice.getByRole('textbox', { name: 'Message' });
    await box.focus();
    await alice.keyboard.type('first line');
    await alice.keyboard.press('Shift+Enter');
    await alice.keyboard.type('second line');
    await alice.keyboard.press('Enter');
    await item(bob, 'second line', { exact: false }).waitFor();
    assert.equal(await item(bob, 'second line', { exact: false }).locator('p.body').textContent(), 'first line\nsecond line');
    assert.equal(await box.inputValue(), '', 'the box is cleared after sending');
  });

  it('a body with HTML renders as text, never as HTML', async () => {
    const xss = '<img src=x onerror=alert(1)>';
    await send(alice, xss);
    await send(bob, '<b>not bold</b> <script>alert(2)</script>');
    for (const page of [alice, bob]) {
      const li = item(page, xss);
      await li.waitFor();
      assert.equal(await li.locator('p.body').textContent(), xss);
      await item(page, '<b>not bold</b>', { exact: false }).waitFor();
      assert.equal(await page.getByRole('log').locator('img').count(), 0, 'no <img> element was created');
      assert.equal(await page.getByRole('log').locator('b, script').count(), 0, 'no <b>/<script> element was created');
    }
    await alice.waitForTimeout(300);
    assert.deepEqual([...alice.dialogs, ...bob.dialogs], [], 'no script ran');
  });

  it('message info shows id, seq, trace id and links to /debug/messages/{id}', async () => {
    const li = item(bob, 'hi bob, are you there?');
    await li.getByRole('button', { name: 'Message info' }).click();
    const dialog = bob.getByRole('dialog', { name: 'Message info' });
    await dialog.waitFor();
    assert.equal((await dialog.locator('dt:text-is("Seq") + dd').textContent()).trim(), '1');
    const id = (await dialog.locator('dt:text-is("ID") + dd').textContent()).trim();
    assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    const trace = (await dialog.locator('dt:text-is("Trace ID") + dd').textContent()).trim();
    assert.match(trace, /^[0-9a-f]{32}$/);
    const link = dialog.getByRole('link', { name: /Message journey/ });
    assert.equal(await link.getAttribute('href'), `/debug/messages/${id}`);
    const res = await fetch(`${server.baseUrl}/debug/messages/${id}`);
    assert.equal(res.status, 200, 'the debug page of the message answers');
    assert.match(await res.text(), new RegExp(trace), 'the journey carries the trace id');
    await screenshot(bob, 'message-info');
    await dialog.getByRole('button', { name: 'Close' }).click();
    await dialog.waitFor({ state: 'hidden' });
  });

  it('the client repairs a gap from history and counts it', async () => {
    // Make Bob's client lose the next two message frames, as a lossy network would.
    await bob.evaluate(() => window.chatApp.client.debugDropMessages(2));
    for (const t of ['gap one', 'gap two', 'gap three']) await send(alice, t);
    await item(bob, 'gap three').waitFor();
    await item(bob, 'gap one').waitFor();
    await item(bob, 'gap two').waitFor();
    await bob.getByText('Gap repairs: 1').waitFor();
    const s = assertContiguous(await seqs(bob), { from: 1 });
    assert.deepEqual(s, assertContiguous(await seqs(alice), { from: 1 }));
    // And a duplicated frame is dropped, not shown twice.
    await bob.evaluate(() => window.chatApp.client.debugDuplicateMessages(1));
    await send(alice, 'said once');
    await item(bob, 'said once').waitFor();
    await bob.waitForTimeout(200);
    assert.equal(await item(bob, 'said once').count(), 1);
    assertContiguous(await seqs(bob), { from: 1 });
  });

  it('a reload shows the history', async () => {
    const before = await bodies(bob);
    await bob.reload();
    await connected(bob);
    await bob.getByRole('heading', { name: '#general' }).waitFor();
    await eventually(async () => (await messageList(bob).count()) === before.length, { message: 'history after reload' });
    assert.deepEqual(await bodies(bob), before);
    assertContiguous(await seqs(bob), { from: 1 });
    // Still live after the reload.
    await send(alice, 'after your reload');
    await item(bob, 'after your reload').waitFor();
  });

  it('joins and leaves rooms', async () => {
    await joinRoom(alice, 'random');
    await joinRoom(bob, 'random');
    await send(bob, 'in random');
    await item(alice, 'in random').waitFor();
    const rooms = alice.getByRole('list', { name: 'Joined rooms' });
    assert.equal(await rooms.getByRole('listitem').count(), 2);
    await alice.getByRole('button', { name: 'Leave random' }).click();
    await eventually(async () => (await rooms.getByRole('listitem').count()) === 1, { message: 'room left' });
    await alice.getByRole('heading', { name: '#general' }).waitFor();
    await bob.getByRole('list', { name: 'Members' }).getByRole('listitem').filter({ hasText: 'alice' }).filter({ hasText: 'offline' }).waitFor();
    await bob.getByRole('button', { name: 'general', exact: true }).click();
    await bob.getByRole('heading', { name: '#general' }).waitFor();
  });

  it('main screen screenshot after all of it (desktop)', async () => {
    await send(bob, 'see you tomorrow');
    await item(alice, 'see you tomorrow').waitFor();
    const file = await screenshot(alice, 'main-end');
    assert.ok(fs.statSync(file).size > 10000);
  });

  it('works at phone width', async () => {
    const phone = await openPage(browser, server, { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
    await signIn(phone, 'dave');
    // The room list is in a drawer on phones.
    const drawerIsOpen = async () => {
      const box = await phone.getByRole('complementary', { name: 'Rooms and members' }).boundingBox();
      return box && box.x >= -1 && box.x + box.width <= 391;
    };
    assert.equal(await drawerIsOpen(), false, 'the drawer starts closed');
    await phone.getByRole('button', { name: 'Rooms and members' }).click();
    await eventually(drawerIsOpen, { message: 'drawer open' });
    await joinRoom(phone, 'general');
    await eventually(async () => !(await drawerIsOpen()), { message: 'drawer closed after joining' });
    await eventually(async () => (await messageList(phone).count()) > 5, { message: 'history on the phone' });
    await send(phone, 'hello from a phone');
    await item(alice, 'hello from a phone').waitFor();
    await deliveryStatus(phone, 'hello from a phone', 'stored').waitFor();
    const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `no horizontal overflow (got ${overflow}px)`);
    for (const name of ['Send']) {
      const box = await phone.getByRole('button', { name }).boundingBox();
      assert.ok(box && box.x + box.width <= 390 && box.y + box.height <= 844, `${name} is on screen`);
    }
    await screenshot(phone, 'phone');
    await phone.getByRole('button', { name: 'Rooms and members' }).click();
    await eventually(drawerIsOpen, { message: 'drawer open' });
    await phone.getByRole('list', { name: 'Members' }).getByText('dave').waitFor();
    await screenshot(phone, 'phone-drawer');
    await phone.keyboard.press('Escape');
    await eventually(async () => !(await drawerIsOpen()), { message: 'Escape closes the drawer' });
    await phone.context().close();
    assert.ok(fs.existsSync(path.join(SCREENSHOT_DIR, 'main.png')));
  });

  it('no script errors on the pages', () => {
    assert.deepEqual([...alice.consoleErrors, ...bob.consoleErrors], []);
  });
});
