// The message chain in the page: a lying process is shown as a visible warning naming room and
// seq, with the message marked, through the real server with faults injected through
// POST /admin/faults (a tampering gateway, an equivocating worker).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  ChatServer, launchBrowser, openPage, signIn, joinRoom, send, item, eventually, screenshot, connected,
} from './lib/harness.mjs';

const WARNING = '⚠ this message failed its integrity check';

/** The failures the page's client recorded. */
function failures(page) {
  return page.evaluate(() => window.chatApp.client.integrityFailures.map(({ room, seq, kind, source }) => ({ room, seq, kind, source })));
}

describe('message chain warnings', () => {
  let server, browser;

  before(async () => {
    server = await new ChatServer({ name: 'integrity', adminToken: 'web-integrity-admin-token' }).start();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('a message rewritten by the gateway (gateway.deliver rewrite) is flagged as altered', async () => {
    const alice = await openPage(browser, server);
    const bob = await openPage(browser, server);
    await signIn(alice, 'alice');
    await joinRoom(alice, 'tamper');
    await signIn(bob, 'bob');
    await joinRoom(bob, 'tamper');
    await send(alice, 'an honest first message');
    await item(bob, 'an honest first message').waitFor();
    assert.equal(await bob.locator('#integrity-banner').isVisible(), false, 'no warning while all is well');

    // The next two writes (alice's copy and bob's) are rewritten, their digest left as it was.
    await server.addFault({ hop: 'gateway.deliver', action: 'rewrite', room: 'tamper', count: 2 });
    await send(alice, 'please pay invoice 42');
    const edited = item(bob, 'please pay invoice 42 (edited in transit)');
    await edited.waitFor();
    const banner = bob.getByRole('alert').filter({ hasText: 'failed its integrity check' });
    await banner.waitFor();
    assert.match(await banner.textContent(), /Message #2 in #tamper failed its integrity check: its contents do not match/);
    await edited.getByText(WARNING).waitFor();
    assert.equal(await item(bob, 'an honest first message').getByText(WARNING).isVisible(), false);
    assert.deepEqual(await failures(bob), [{ room: 'tamper', seq: 2, kind: 'altered', source: 'live' }]);
    // The sender's page shows what she typed, and is warned all the same.
    await alice.getByRole('alert').filter({ hasText: 'Message #2 in #tamper' }).waitFor();
    await item(alice, 'please pay invoice 42').getByText(WARNING).waitFor();
    await screenshot(bob, 'integrity-altered');
    await alice.context().close();
    await bob.context().close();
  });

  it('a forged copy published by the worker (fanout.publish equivocate) is flagged as a fork', async () => {
    const alice = await openPage(browser, server);
    const bob = await openPage(browser, server);
    await signIn(alice, 'alice');
    await joinRoom(alice, 'forked');
    await signIn(bob, 'bob');
    await joinRoom(bob, 'forked');
    await send(alice, 'first');
    await item(bob, 'first').waitFor();

    await server.addFault({ hop: 'fanout.publish', action: 'equivocate', room: 'forked', count: 1 });
    await send(alice, 'the real second message');
    // The forged copy passes its own check: nothing shows until the next message.
    const forged = item(bob, 'the real second message (forged by the worker)');
    await forged.waitFor();
    await send(alice, 'third');
    const banner = bob.getByRole('alert').filter({ hasText: 'failed its integrity check' });
    await banner.waitFor();
    assert.match(await banner.textContent(), /Message #3 in #forked failed its integrity check: it does not chain to message #2/);
    await forged.getByText(WARNING).waitFor();
    await item(bob, 'third').getByText(WARNING).waitFor();
    assert.equal(await item(bob, 'first').getByText(WARNING).isVisible(), false);
    assert.deepEqual(await failures(bob), [{ room: 'forked', seq: 3, kind: 'fork', source: 'live' }]);
    await screenshot(bob, 'integrity-fork');

    // The store holds the true message: a reload shows it, from history, with no warning.
    await bob.reload();
    await connected(bob);
    await bob.getByRole('heading', { name: '#forked' }).waitFor();
    await eventually(async () => (await item(bob, 'the real second message').count()) === 1, { message: 'the true message from history' });
    assert.equal(await item(bob, 'the real second message').getByText(WARNING).isVisible(), false);
    assert.equal(await bob.locator('#integrity-banner').isVisible(), false, 'the true history chains');
    await alice.context().close();
    await bob.context().close();
  });
});
