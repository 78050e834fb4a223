// Test harness: starts the REAL chat server binary and a headless Debian Chromium.
//
// Environment:
//   CHAT_BIN        the server binary (default ../target/debug/chat relative to web/)
//   CHROMIUM_PATH   the browser (default /usr/bin/chromium)
//   CHAT_TEST_SLOWMO  milliseconds between Playwright actions, for watching a run
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const WEB_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const CHAT_BIN = path.resolve(WEB_DIR, process.env.CHAT_BIN || '../target/debug/chat');
export const SCREENSHOT_DIR = path.join(WEB_DIR, 'screenshots');
export const RESULTS_DIR = path.join(WEB_DIR, 'test-results');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** A TCP port that was free a moment ago (listen on 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value (returned) or the deadline passes (throws). */
export async function eventually(fn, { timeout = 15000, interval = 100, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${message}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    }
    await sleep(interval);
  }
}

/**
 * The real server process: start, SIGKILL, restart on the same port and data dir. With
 * `adminToken` it serves the admin API (`POST /admin/faults`, see addFault).
 */
export class ChatServer {
  constructor({ name, jwtSecret, adminToken } = {}) {
    this.name = name || 'server';
    this.jwtSecret = jwtSecret;
    this.adminToken = adminToken;
    this.dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-e2e-data-'));
    this.proc = null;
    this.port = null;
    this.starts = 0;
  }

  get baseUrl() { return `http://127.0.0.1:${this.port}`; }

  async start({ timeout = 60000 } = {}) {
    if (!fs.existsSync(CHAT_BIN)) {
      throw new Error(`server binary not found at ${CHAT_BIN}: build it (cargo build -p chat) or set CHAT_BIN`);
    }
    if (this.port === null) this.port = await freePort();
    fs.mkdirSync(RESULTS_DIR, { recursive: true });
    this.starts++;
    this.logFile = path.join(RESULTS_DIR, `${this.name}-${this.starts}.log`);
    const log = fs.openSync(this.logFile, 'w');
    const args = ['--listen', `127.0.0.1:${this.port}`, '--data-dir', this.dataDir];
    if (this.jwtSecret) args.push('--jwt-secret', this.jwtSecret);
    if (this.adminToken) args.push('--admin-token', this.adminToken);
    const proc = spawn(CHAT_BIN, args, {
      stdio: ['ignore', log, log],
      env: { RUST_LOG: 'info', ...process.env },
    });
    fs.closeSync(log);
    this.proc = proc;
    let exited = null;
    proc.on('exit', (code, signal) => { exited = { code, signal }; });
    this.exited = new Promise((resolve) => proc.on('exit', resolve));
    // Ready when /readyz answers 200; poll with a deadline (a restart may first meet TIME_WAIT etc.).
    const deadline = Date.now() + timeout;
    for (;;) {
      if (exited) throw new Error(`server exited early (${JSON.stringify(exited)}):\n${this.logTail()}`);
      try {
        const res = await fetch(`${this.baseUrl}/readyz`, { signal: AbortSignal.timeout(1000) });
        if (res.status === 200) return this;
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) {
        await this.kill();
        throw new Error(`server not ready after ${timeout} ms:\n${this.logTail()}`);
      }
      await sleep(100);
    }
  }

  /** Injects a fault through the admin API (the server must have been given an adminToken). */
  async addFault(fault) {
    const res = await fetch(`${this.baseUrl}/admin/faults`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${this.adminToken}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(fault),
    });
    if (res.status !== 201) throw new Error(`POST /admin/faults ${JSON.stringify(fault)}: ${res.status} ${await res.text()}`);
    return res.json();
  }

  logTail(n = 40) {
    try { return fs.readFileSync(this.logFile, 'utf8').split('\n').slice(-n).join('\n'); } catch { return '(no log)'; }
  }

  /** Kills the process (SIGKILL by default: no graceful shutdown) and waits for it to exit. */
  async kill(signal = 'SIGKILL') {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) { this.proc = null; return; }
    proc.kill(signal);
    await this.exited;
    this.proc = null;
  }

  /** Graceful stop (SIGTERM, then SIGKILL after 5 s) and removal of the data dir. */
  async stop() {
    const proc = this.proc;
    if (proc && proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      await this.exited;
      clearTimeout(t);
    }
    this.proc = null;
    fs.rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/**
 * Headless Debian Chromium through playwright-core, with the machine's flags. Playwright gives
 * every launch a fresh, empty --user-data-dir of its own (a temp dir removed on close).
 */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    slowMo: Number(process.env.CHAT_TEST_SLOWMO) || 0,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}

/** A new, isolated browser context (own storage) with one page at the server's `/`. */
export async function openPage(browser, server, { viewport = { width: 1280, height: 800 }, query = '', ...ctxOpts } = {}) {
  const context = await browser.newContext({ viewport, ...ctxOpts });
  const page = await context.newPage();
  page.dialogs = [];
  page.on('dialog', (d) => { page.dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  page.consoleErrors = [];
  page.on('pageerror', (e) => page.consoleErrors.push(String(e)));
  // Every frame the page sends on its WebSockets, parsed (to check e.g. `join` carries `since`).
  page.wsSent = [];
  page.on('websocket', (ws) => ws.on('framesent', ({ payload }) => {
    try { page.wsSent.push(JSON.parse(payload)); } catch { /* not JSON */ }
  }));
  await page.goto(`${server.baseUrl}/${query}`);
  return page;
}

export async function signIn(page, name) {
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await connected(page);
}

export async function signInWithToken(page, token) {
  await page.getByText('Use a token instead').click();
  await page.getByLabel('Token', { exact: true }).fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
}

export function connStatus(page) { return page.locator('#conn'); }

export async function connected(page, timeout = 30000) {
  await page.locator('#conn[data-state="open"]').waitFor({ timeout });
}

export async function joinRoom(page, room) {
  await page.getByLabel('Room', { exact: true }).fill(room);
  await page.getByRole('button', { name: 'Join' }).click();
  await page.getByRole('heading', { name: `#${room}` }).waitFor();
}

export function messageList(page) { return page.getByRole('log').getByRole('listitem'); }

/** Types a message in the Message box and sends it with the Send button (or Enter). */
export async function send(page, text, { key = false } = {}) {
  const box = page.getByRole('textbox', { name: 'Message' });
  await box.fill(text);
  if (key) await box.press('Enter');
  else await page.getByRole('button', { name: 'Send' }).click();
}

/** The listitem whose body is `body` (whole text; `{ exact: false }` for a part of it). */
export function item(page, body, { exact = true } = {}) {
  return messageList(page).filter({ has: page.locator('p.body').getByText(body, { exact }) });
}

/**
 * The delivery status ("sending", "stored" or "failed") shown on one of your own messages, matched
 * whole: a failed send's error text ("Not sent: not stored after 4 s") must not pass for "stored".
 */
export function deliveryStatus(page, body, state) {
  return item(page, body).locator('.meta .status', { hasText: new RegExp(`^${state}$`) });
}

/** Seqs of the listed messages, in DOM order (null for not-yet-stored ones). */
export async function seqs(page) {
  return messageList(page).evaluateAll((lis) => lis.map((li) => (li.dataset.seq ? Number(li.dataset.seq) : null)));
}

/** Bodies of the listed messages, in DOM order. */
export async function bodies(page) {
  return page.getByRole('log').locator('li p.body').allTextContents();
}

/** Asserts: stored seqs strictly consecutive (no gap, no duplicate), from `from` when given. */
export function assertContiguous(list, { from, to } = {}) {
  const s = list.filter((x) => x !== null);
  for (let i = 1; i < s.length; i++) {
    if (s[i] !== s[i - 1] + 1) throw new Error(`seqs not contiguous at index ${i}: ${s[i - 1]} then ${s[i]} (all: ${s.join(',')})`);
  }
  if (from !== undefined && s[0] !== from) throw new Error(`first seq ${s[0]}, expected ${from}`);
  if (to !== undefined && s[s.length - 1] !== to) throw new Error(`last seq ${s[s.length - 1]}, expected ${to}`);
  return s;
}

export async function screenshot(page, name) {
  fs.mkdirSync(SCREENSHOT_DIR, { recursive: true });
  const file = path.join(SCREENSHOT_DIR, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}

/** An HS256 JWT, as the server's --jwt-secret mode expects. */
export function makeJwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ iat: now, exp: now + 3600, ...claims });
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}
