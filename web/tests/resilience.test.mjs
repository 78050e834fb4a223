// End-to-end: the server is killed (SIGKILL) mid-conversation and restarted on the same port and
// data dir. The pages show "reconnecting…", reconnect by themselves, rejoin with `since`, and end
// with every message exactly once, in seq order, without a gap.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  ChatServer, launchBrowser, openPage, signIn, joinRoom, send, item, deliveryStatus, seqs, bodies,
  assertContiguous, screenshot, connected, sleep,
} from './lib/harness.mjs';

describe('server killed and restarted mid-conversation', () => {
  let server, browser, alice, bob, carol;

  before(async () => {
    server = await new ChatServer({ name: 'resilience' }).start();
    browser = await launchBrowser();
    alice = await openPage(browser, server);
    bob = await openPage(browser, server);
    // Carol gives up on a send after 4 s, so that the "failed" state can be reached in a test.
    // Alice and Bob keep the default (60 s): their sends must outlive a restart on a slow machine.
    carol = await openPage(browser, server, { query: '?sendGiveUpMs=4000' });
    for (const [page, name] of [[alice, 'alice'], [bob, 'bob'], [carol, 'carol']]) {
      await signIn(page, name);
      await joinRoom(page, 'ops');
    }
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('shows "reconnecting…" and then every message with no gap or duplicate', async () => {
    const sent = [];
    const say = async (page, text, opts) => { sent.push(text); await send(page, text, opts); };
    await say(alice, 'before the crash 1');
    await say(bob, 'before the crash 2');
    await say(alice, 'before the crash 3');
    await item(bob, 'before the crash 3').waitFor();
    await item(alice, 'before the crash 2').waitFor();

    // A burst, and the server dies in the middle of it (the kill is not awaited: sends keep
    // going while it happens), so some sends are acked, some are in flight, some are not sent.
    let killed;
    for (let i = 1; i <= 8; i++) {
      const text = `burst ${i}`;
      sent.push(text);
      await alice.getByRole('textbox', { name: 'Message' }).fill(text);
      await alice.getByRole('textbox', { name: 'Message' }).press('Enter');
      if (i === 3) killed = server.kill('SIGKILL');
    }
    await killed;

    for (const page of [alice, bob]) await page.getByRole('status').getByText('reconnecting…').waitFor({ timeout: 10000 });
    const bobSeqAtCrash = Math.max(...(await seqs(bob)).filter((x) => x !== null));
    const bobJoinsBefore = bob.wsSent.filter((f) => f.type === 'join').length;
    // While the server is down: Bob writes too; his message waits in "sending".
    await say(bob, 'written while the server was down');
    await deliveryStatus(bob, 'written while the server was down', 'sending').waitFor();
    await screenshot(alice, 'reconnecting');
    await sleep(1500);

    await server.start();
    await connected(alice);
    await connected(bob);

    // Everything sent gets stored (retried with the same client_msg_id) and shown on both pages.
    await deliveryStatus(bob, 'written while the server was down', 'stored').waitFor({ timeout: 30000 });
    for (let i = 1; i <= 8; i++) await deliveryStatus(alice, `burst ${i}`, 'stored').waitFor({ timeout: 30000 });
    await say(alice, 'after the restart');
    await say(bob, 'after the restart, too');
    for (const page of [alice, bob]) {
      for (const t of sent) await item(page, t).waitFor({ timeout: 30000 });
    }

    for (const page of [alice, bob]) {
      const s = assertContiguous(await seqs(page), { from: 1 });
      assert.equal(s.length, sent.length, 'one list item per message sent');
      const b = await bodies(page);
      assert.deepEqual([...b].sort(), [...sent].sort(), 'each message exactly once');
      assert.equal(new Set(b).size, b.length, 'no duplicate');
    }
    assert.deepEqual(await seqs(alice), await seqs(bob));
    assert.deepEqual(await bodies(alice), await bodies(bob), 'same order on both pages');
    assert.ok(Number(await alice.locator('#dbg-reconnects').textContent()) >= 1);
    // Bob rejoined with `since` = the last seq he showed, and the server's replay left no gap
    // to repair.
    const rejoin = bob.wsSent.filter((f) => f.type === 'join').slice(bobJoinsBefore);
    assert.ok(rejoin.length >= 1, 'bob rejoined');
    assert.deepEqual({ room: rejoin[0].room, since: rejoin[0].since }, { room: 'ops', since: bobSeqAtCrash });
    await bob.getByText('Gap repairs: 0').waitFor();
    // Unacked sends were resent with their first client_msg_id, never a new one.
    const sends = alice.wsSent.filter((f) => f.type === 'send');
    const idsByBody = new Map();
    for (const f of sends) idsByBody.set(f.body, new Set([...(idsByBody.get(f.body) || []), f.client_msg_id]));
    for (const [body, ids] of idsByBody) assert.equal(ids.size, 1, `one client_msg_id for "${body}"`);
    await screenshot(alice, 'after-restart');
  });

  it('a send that cannot be stored fails, and Retry resends the same client_msg_id', async () => {
    await server.kill('SIGKILL');
    await carol.getByRole('status').getByText('reconnecting…').waitFor({ timeout: 10000 });
    await send(carol, 'this one will fail first');
    const li = item(carol, 'this one will fail first');
    await deliveryStatus(carol, 'this one will fail first', 'sending').waitFor();
    await deliveryStatus(carol, 'this one will fail first', 'failed').waitFor({ timeout: 15000 });
    await li.getByText('Not sent: not stored after 4 s').waitFor();
    const retry = li.getByRole('button', { name: 'Retry' });
    await retry.waitFor();
    await screenshot(carol, 'failed-send');

    const cmidOf = async () => {
      await li.getByRole('button', { name: 'Message info' }).click();
      const dialog = carol.getByRole('dialog', { name: 'Message info' });
      const cmid = (await dialog.locator('dt:text-is("Client message ID") + dd').textContent()).trim();
      await dialog.getByRole('button', { name: 'Close' }).click();
      return cmid;
    };
    const cmidBefore = await cmidOf();
    assert.match(cmidBefore, /^c-/);

    await server.start();
    await connected(carol);
    await retry.click();
    await deliveryStatus(carol, 'this one will fail first', 'stored').waitFor({ timeout: 20000 });
    assert.equal(await retry.isVisible(), false);
    assert.equal(await cmidOf(), cmidBefore, 'the retry used the same client_msg_id');
    await item(bob, 'this one will fail first').waitFor({ timeout: 20000 });
    await sleep(300);
    for (const page of [carol, bob]) {
      assert.equal(await item(page, 'this one will fail first').count(), 1);
      assertContiguous(await seqs(page), { from: 1 });
    }
  });

  it('a graceful restart (draining, `reconnect` frame) is survived the same way', async () => {
    await bob.evaluate(() => {
      window.drained = new Promise((resolve) => {
        window.chatApp.client.once('server-reconnect', (e) => resolve(e.reason));
      });
    });
    await server.kill('SIGTERM');
    assert.equal(await bob.evaluate(() => window.drained), 'draining', 'the page got a `reconnect` frame');
    await bob.getByRole('status').getByText('reconnecting…').waitFor({ timeout: 10000 });
    await send(bob, 'sent during the drain');
    await server.start();
    await connected(alice);
    await connected(bob);
    await deliveryStatus(bob, 'sent during the drain', 'stored').waitFor({ timeout: 20000 });
    await item(alice, 'sent during the drain').waitFor({ timeout: 20000 });
    for (const page of [alice, bob]) assertContiguous(await seqs(page), { from: 1 });
    assert.deepEqual(await bodies(alice), await bodies(bob));
  });
});
