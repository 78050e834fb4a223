// End-to-end: sign in with a token when the server runs with --jwt-secret.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  ChatServer, launchBrowser, openPage, signInWithToken, joinRoom, send, item, deliveryStatus, connected, makeJwt,
} from './lib/harness.mjs';

const SECRET = 'e2e-test-secret-0123456789abcdef';

describe('auth mode', () => {
  let server, browser;

  before(async () => {
    server = await new ChatServer({ name: 'auth', jwtSecret: SECRET }).start();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('a name alone is refused and the page asks for a token', async () => {
    const page = await openPage(browser, server);
    await page.getByLabel('Name', { exact: true }).fill('mallory');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.getByRole('alert').filter({ hasText: 'needs a token' }).waitFor({ timeout: 15000 });
    await page.getByLabel('Token', { exact: true }).waitFor();
    await page.context().close();
  });

  it('a bad token is refused', async () => {
    const page = await openPage(browser, server);
    await signInWithToken(page, makeJwt('not-the-secret', { sub: 'mallory' }));
    await page.getByRole('alert').filter({ hasText: 'refused this token' }).waitFor({ timeout: 15000 });
    await page.context().close();
  });

  it('a good token signs in as its sub; its rooms claim limits the rooms', async () => {
    const page = await openPage(browser, server);
    await signInWithToken(page, makeJwt(SECRET, { sub: 'erin', rooms: ['general'] }));
    await connected(page);
    await page.locator('#me').filter({ hasText: 'erin' }).waitFor();
    await joinRoom(page, 'general');
    await send(page, 'signed in with a token');
    const li = item(page, 'signed in with a token');
    await deliveryStatus(page, 'signed in with a token', 'stored').waitFor();
    assert.equal(await li.locator('.sender').textContent(), 'erin');

    await page.getByLabel('Room', { exact: true }).fill('secret');
    await page.getByRole('button', { name: 'Join' }).click();
    await page.getByRole('alert').filter({ hasText: 'not allowed' }).waitFor({ timeout: 10000 });
    assert.equal(await page.getByRole('list', { name: 'Joined rooms' }).getByRole('listitem').count(), 1);
    await page.context().close();
  });

  it('a token that expires while connected sends the user back to sign in', async () => {
    const page = await openPage(browser, server);
    const now = Math.floor(Date.now() / 1000);
    await signInWithToken(page, makeJwt(SECRET, { sub: 'frank', exp: now + 1 }));
    await connected(page);
    // The gateway allows 5 s of leeway past exp, then closes with 4001.
    await page.getByRole('alert').filter({ hasText: 'token expired' }).waitFor({ timeout: 20000 });
    await page.getByLabel('Token', { exact: true }).waitFor();
    await page.context().close();
  });
});
