// chat-client.js — a reusable browser client for the chat protocol v1 (WebSocket at /ws).
//
// No dependencies, no build step: import it as an ES module.
//
//   import { ChatClient } from '/chat-client.js';
//   const client = new ChatClient({ url: 'ws://localhost:8080/ws', user: 'alice' });
//   client.on('message', (m) => console.log(m.room, m.seq, m.user, m.body));
//   await client.connect();
//   await client.join('general');
//   await client.send('general', 'hello');
//
// What it does for you:
// - hello (name or token) and resolves connect() on `welcome`;
// - reconnects after a drop with jittered exponential backoff, and rejoins every room with
//   `since` = the last seq it delivered, so the server replays what was missed;
// - delivers `message` events per room in seq order, each exactly once and without gaps: it checks
//   seq continuity itself, drops duplicates and, on a gap, fetches the missing range with
//   `history` (`after`/`limit`) before it delivers anything after the gap (counted in `stats`);
// - `send` is retried (same `client_msg_id`, so the server stores it once) across timeouts,
//   `unavailable`/`rate_limited` errors and reconnects, until an `ack` or a give-up deadline;
// - checks the message chain (docs/protocol.md, "Message chain") of what it delivers and of the
//   history pages it returns: a message whose digest does not match its fields (`altered`), or
//   whose `prev` is not the digest of the seq before it as delivered (`fork`), is reported with an
//   `integrity` event and kept in `integrityFailures` (the message is still delivered). Needs
//   `crypto.subtle` (a secure context: https, or localhost); without it nothing is checked.
//
// See docs/web-client.md for the whole API.

const DEFAULTS = {
  backoff: { initialMs: 250, maxMs: 8000, factor: 2, jitter: 0.5 },
  helloTimeoutMs: 10000,
  requestTimeoutMs: 15000,
  sendAttemptTimeoutMs: 8000,
  sendGiveUpMs: 60000,
  pingIntervalMs: 20000,
  pongTimeoutMs: 10000,
  typingThrottleMs: 2500,
  joinCheckMs: 2000,
};

/** Error codes after which a send is tried again with the same `client_msg_id`. */
const RETRYABLE_SEND_ERRORS = new Set(['unavailable', 'rate_limited', 'internal']);

/** How many recent send attempts' `req`s are remembered, to match late error answers. */
const SEND_REQS_KEPT = 4096;

/** An error from the server (`error` frame) or from the client itself. */
export class ChatError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = 'ChatError';
    this.code = code;
    this.frame = frame;
  }
}

/** Valid user name: 1–64 of A-Z a-z 0-9 _ - . */
export const USER_RE = /^[A-Za-z0-9_.-]{1,64}$/;
/** Valid room name: 1–64 of A-Z a-z 0-9 _ - */
export const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** The WebSocket URL of the page's own gateway: ws(s)://<host>/ws. */
export function defaultUrl(loc = globalThis.location) {
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${loc.host}/ws`;
}

/** The `prev` of a room's first message. */
export const CHAIN_GENESIS = '0'.repeat(64);

/**
 * The chain digest of message `m` chained to `prev`: lowercase hex SHA-256 of
 * "chat-chain-v1\n" + prev + "\n" + room + "\n" + seq + "\n" + id + "\n" + user + "\n" + ts +
 * "\n" + client_msg_id + "\n" + body. Resolves with null when `crypto.subtle` is missing.
 */
export async function chainDigest(prev, m, subtle = globalThis.crypto?.subtle) {
  if (!subtle) return null;
  const input = ['chat-chain-v1', prev, m.room, m.seq, String(m.id).toLowerCase(), m.user, m.ts, m.client_msg_id, m.body].join('\n');
  const hash = await subtle.digest('SHA-256', new TextEncoder().encode(input));
  return [...new Uint8Array(hash)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Checks one message against the chain head `head` ({ seq, digest, id } of the seq before it
 * as received, or null): resolves with the failures ({ kind: 'altered'|'fork', expected, got,
 * previousId? }), empty when it passes or carries no digest.
 */
export async function checkChain(m, head, subtle = globalThis.crypto?.subtle) {
  if (!subtle || typeof m.digest !== 'string') return [];
  const prev = typeof m.prev === 'string' ? m.prev : '';
  const failures = [];
  const expected = await chainDigest(prev, m, subtle);
  if (expected !== m.digest) failures.push({ kind: 'altered', expected, got: m.digest });
  if (head && head.seq + 1 === m.seq && head.digest !== prev) {
    failures.push({ kind: 'fork', expected: head.digest, got: prev, previousId: head.id });
  }
  return failures;
}

/** A fresh client_msg_id (≤ 64 chars). */
export function newClientMsgId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return `c-${c.randomUUID()}`;
  return `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
}

/**
 * Backoff delay for the given attempt (0-based): exponential, capped, with "equal jitter"
 * (a random point in the upper `jitter` fraction of the step), so that many clients dropped at
 * once do not come back at the same instant.
 */
export function backoffDelay(attempt, { initialMs, maxMs, factor, jitter }, rand = Math.random) {
  const base = Math.min(maxMs, initialMs * Math.pow(factor, Math.min(attempt, 30)));
  return Math.round(base * (1 - jitter) + base * jitter * rand());
}

class Emitter {
  constructor() { this._handlers = new Map(); }
  /** Subscribes; returns a function that unsubscribes. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) { this._handlers.get(event)?.delete(fn); }
  once(event, fn) {
    const off = this.on(event, (...args) => { off(); fn(...args); });
    return off;
  }
  emit(event, payload) {
    for (const fn of [...(this._handlers.get(event) || [])]) {
      try { fn(payload); } catch (e) { console.error(`chat-client: '${event}' handler threw`, e); }
    }
    for (const fn of [...(this._handlers.get('*') || [])]) {
      try { fn(event, payload); } catch (e) { console.error('chat-client: * handler threw', e); }
    }
  }
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {}); // callers that don't await must not cause unhandled rejections
  return { promise, resolve, reject };
}

/**
 * Connection states, in `client.state` and the `state` event:
 * - `idle`: not connected yet; `connecting`: first connection attempt;
 * - `open`: welcomed, requests flow; `reconnecting`: dropped, waiting for / making the next attempt;
 * - `closed`: close() was called, or the server refused the credentials (see `fatal`).
 */
export class ChatClient extends Emitter {
  /**
   * @param {object} opts
   * @param {string} [opts.url] WebSocket URL (default: ws(s)://<location.host>/ws)
   * @param {string} [opts.user] user name (dev mode)
   * @param {string} [opts.token] HS256 JWT (auth mode); sent in `hello`
   * @param {Function} [opts.WebSocket] WebSocket implementation (default: globalThis.WebSocket)
   * @param {object} [opts.backoff] { initialMs, maxMs, factor, jitter }
   * @param {number} [opts.sendGiveUpMs] a send not acked after this long fails (default 60 s)
   * @param {number} [opts.sendAttemptTimeoutMs] resend when no ack after this long (default 8 s)
   */
  constructor(opts = {}) {
    super();
    const given = Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined));
    const backoff = Object.fromEntries(Object.entries(opts.backoff || {}).filter(([, v]) => v !== undefined));
    this.opts = { ...DEFAULTS, ...given, backoff: { ...DEFAULTS.backoff, ...backoff } };
    this.url = opts.url || defaultUrl();
    this.WS = opts.WebSocket || globalThis.WebSocket;
    this.state = 'idle';
    this.user = null;
    this.session = null;
    this.gateway = null;
    this.stats = {
      gapRepairs: 0, // gaps detected and filled from history
      repairedMessages: 0, // messages that came from those history fetches
      duplicatesDropped: 0, // message frames whose seq was already delivered
      reconnects: 0, // successful reconnections after a drop
      sendRetries: 0, // resends of a not-yet-acked message
      staleSendErrors: 0, // retryable errors for an attempt a later attempt or an ack overtook
      integrityFailures: 0, // messages that failed a message-chain check
    };
    /** Every message-chain failure seen: { room, seq, id, kind, expected, got, previousId?, source }. */
    this.integrityFailures = [];
    this._integrityKeys = new Set();
    this._ws = null;
    this._gen = 0;
    this._attempt = 0;
    this._reqSeq = 0;
    this._pending = new Map(); // req -> { frame, resolve, reject, timer, kind }
    this._sendReqs = new Map(); // req -> client_msg_id of every recent send attempt (bounded)
    this._rooms = new Map(); // room -> RoomState
    this._outbox = new Map(); // client_msg_id -> send entry
    this._welcome = null; // deferred for connect()
    this._timers = { reconnect: null, hello: null, ping: null, pong: null };
    this._closedByUser = false;
    this._draining = false;
    this._lastTyping = new Map();
    this._debug = { dropMessages: 0, duplicateMessages: 0 };
    this._onOnline = () => { if (this.state === 'reconnecting') this.reconnectNow(); };
  }

  // ---------------------------------------------------------------- connection

  /** Connects and says hello; resolves with the `welcome` frame. Reconnects by itself afterwards. */
  connect() {
    if (this._welcome && this.state !== 'closed') return this._welcome.promise;
    this._closedByUser = false;
    this._fatal = null;
    this._welcome = deferred();
    this._attempt = 0;
    globalThis.addEventListener?.('online', this._onOnline);
    this._open();
    return this._welcome.promise;
  }

  /** Closes the connection for good (no reconnect). Pending sends fail. */
  close() {
    this._closedByUser = true;
    globalThis.removeEventListener?.('online', this._onOnline);
    clearTimeout(this._timers.reconnect);
    const ws = this._ws;
    this._detach();
    try { ws?.close(1000, 'bye'); } catch { /* already closed */ }
    this._afterDisconnect({ code: 1000, reason: 'closed by client' });
  }

  /** While `reconnecting`: skip the rest of the backoff wait and try now. */
  reconnectNow() {
    if (this.state !== 'reconnecting' || this._ws) return;
    clearTimeout(this._timers.reconnect);
    this._open();
  }

  get isOpen() { return this.state === 'open'; }

  _setState(state, extra = {}) {
    if (this.state === state && !extra.force) return;
    this.state = state;
    this.emit('state', { state, ...extra });
  }

  _open() {
    const gen = ++this._gen;
    this._setState(this._attempt === 0 && !this.session ? 'connecting' : 'reconnecting', { attempt: this._attempt });
    let ws;
    try {
      ws = new this.WS(this.url);
    } catch (e) {
      this._ws = null;
      this._scheduleReconnect({ code: 0, reason: String(e) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (gen !== this._gen) return;
      const hello = { type: 'hello' };
      if (this.opts.token) hello.token = this.opts.token;
      else hello.user = this.opts.user;
      this._sendRaw(hello);
    };
    ws.onmessage = (ev) => { if (gen === this._gen) this._onFrame(ev.data); };
    ws.onclose = (ev) => {
      if (gen !== this._gen) return;
      this._detach();
      this._afterDisconnect({ code: ev.code, reason: ev.reason });
    };
    ws.onerror = () => { /* a close event follows */ };
    clearTimeout(this._timers.hello);
    this._timers.hello = setTimeout(() => {
      if (gen === this._gen && !this.isOpen) this._drop(4000, 'no welcome in time');
    }, this.opts.helloTimeoutMs);
  }

  /** Forgets the current socket without waiting for a close handshake. */
  _detach() {
    const ws = this._ws;
    if (ws) { ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null; }
    this._ws = null;
    this._gen++;
    clearTimeout(this._timers.hello);
    clearInterval(this._timers.ping);
    clearTimeout(this._timers.pong);
  }

  /** Drops a socket we consider dead and goes on as after a close. */
  _drop(code, reason) {
    const ws = this._ws;
    this._detach();
    try { ws?.close(); } catch { /* ignore */ }
    this._afterDisconnect({ code, reason });
  }

  _afterDisconnect({ code, reason }) {
    const wasOpen = this.isOpen;
    if (code === 1008 && !this._closedByUser && !this._fatal) {
      // Policy violation: the server refused our credentials. Retrying will not help.
      this._fatal = new ChatError('unauthorized', reason || 'the server refused the credentials');
    }
    if (code === 4001 && !this._closedByUser && !this._fatal) {
      // The token expired while connected: the same token would be refused again.
      this._fatal = new ChatError('unauthorized', 'token expired: sign in with a fresh token');
    }
    for (const r of this._rooms.values()) { r.joined = false; r.joinInFlight = false; clearTimeout(r.checkTimer); }
    for (const e of this._outbox.values()) { clearTimeout(e.attemptTimer); e.inFlight = false; }
    // Requests in flight: reads are re-sent after the reconnect; joins are redone per room;
    // pings and leaves are settled now.
    for (const [req, p] of this._pending) {
      clearTimeout(p.timer);
      if (p.kind === 'history') { p.inFlight = false; continue; }
      this._pending.delete(req);
      if (p.kind === 'leave') p.resolve({ type: 'left', room: p.room });
      else p.reject(new ChatError('disconnected', 'connection lost'));
    }
    this.emit('disconnect', { code, reason, wasOpen });
    if (this._closedByUser) {
      this._failAll(new ChatError('closed', 'client closed'));
      this._setState('closed', { code, reason });
      return;
    }
    if (this._fatal) {
      const err = this._fatal;
      this._failAll(err);
      this._setState('closed', { code, reason, error: err });
      this._welcome?.reject(err);
      this.emit('fatal', err);
      return;
    }
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect({ code, reason }) {
    let delay;
    if (this._draining) {
      // The gateway is draining on purpose: come back quickly, spread over half a second.
      delay = Math.round(Math.random() * 500);
      this._draining = false;
    } else {
      delay = backoffDelay(this._attempt, this.opts.backoff);
    }
    this._attempt++;
    this._setState('reconnecting', { attempt: this._attempt, delayMs: delay, code, reason, force: true });
    this.emit('reconnecting', { attempt: this._attempt, delayMs: delay, code, reason });
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => this._open(), delay);
  }

  _failAll(err) {
    for (const e of [...this._outbox.values()]) this._failSend(e, err);
    for (const [req, p] of this._pending) { clearTimeout(p.timer); p.reject(err); this._pending.delete(req); }
    for (const r of this._rooms.values()) for (const w of r.joinWaiters.splice(0)) w.reject(err);
  }

  _sendRaw(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _startPing() {
    clearInterval(this._timers.ping);
    if (!this.opts.pingIntervalMs) return;
    this._timers.ping = setInterval(() => {
      this.ping().catch(() => {});
      clearTimeout(this._timers.pong);
      this._timers.pong = setTimeout(() => {
        if (this._lastPong < Date.now() - this.opts.pongTimeoutMs) this._drop(4001, 'pong timeout');
      }, this.opts.pongTimeoutMs + 50);
    }, this.opts.pingIntervalMs);
  }

  // ---------------------------------------------------------------- frames in

  _onFrame(text) {
    let f;
    try { f = JSON.parse(text); } catch { return; }
    if (!f || typeof f.type !== 'string') return;
    this.emit('frame', f);
    switch (f.type) {
      case 'welcome': return this._onWelcome(f);
      case 'joined': return this._onJoined(f);
      case 'left': return this._resolveReq(f);
      case 'ack': return this._onAck(f);
      case 'message': return this._onMessage(f);
      case 'history': return this._resolveReq(f);
      case 'presence': return this._onPresence(f);
      case 'typing':
        if (f.user !== this.user) this.emit('typing', { room: f.room, user: f.user });
        return;
      case 'pong': this._lastPong = Date.now(); return this._resolveReq(f);
      case 'reconnect':
        this._draining = true;
        this.emit('server-reconnect', { reason: f.reason });
        return;
      case 'error': return this._onError(f);
      default: return; // unknown frame types are ignored (forward compatible)
    }
  }

  _onWelcome(f) {
    clearTimeout(this._timers.hello);
    const reconnected = this.session !== null;
    this.user = f.user;
    this.session = f.session;
    this.gateway = f.gateway;
    this._attempt = 0;
    this._lastPong = Date.now();
    if (reconnected) this.stats.reconnects++;
    this._setState('open', { reconnected });
    this.emit('welcome', { ...f, reconnected });
    this._welcome?.resolve(f);
    this._startPing();
    // Rejoin every room we want, with `since` where we already have messages.
    for (const r of this._rooms.values()) this._sendJoin(r);
    // Re-send reads that were in flight when the connection dropped.
    for (const [req, p] of this._pending) if (!p.inFlight) this._transmit(req, p);
  }

  _resolveReq(f) {
    if (f.req === undefined || f.req === null) return;
    const p = this._pending.get(f.req);
    if (!p) return;
    this._pending.delete(f.req);
    clearTimeout(p.timer);
    p.resolve(f);
  }

  _onError(f) {
    const err = new ChatError(f.code, f.message, f);
    if (f.code === 'unauthorized' && !this.isOpen) {
      // Bad or missing credentials in hello: the server closes with 1008 next.
      this._fatal = err;
      this.emit('error', err);
      return;
    }
    const req = f.req;
    if (req !== undefined && req !== null) {
      const clientMsgId = this._sendReqs.get(req);
      if (clientMsgId !== undefined) return this._onSendAttemptError(clientMsgId, req, err);
      const p = this._pending.get(req);
      if (p) {
        this._pending.delete(req);
        clearTimeout(p.timer);
        if (p.kind === 'join') {
          const r = this._rooms.get(p.room);
          if (r) {
            this._rooms.delete(p.room);
            for (const w of r.joinWaiters.splice(0)) w.reject(err);
            for (const e of [...this._outbox.values()]) if (e.room === p.room) this._failSend(e, err);
          }
        }
        p.reject(err);
        this.emit('error', err);
        return;
      }
    }
    this.emit('error', err);
  }

  // ---------------------------------------------------------------- requests

  _request(frame, { kind = frame.type, timeoutMs = this.opts.requestTimeoutMs, room } = {}) {
    const req = ++this._reqSeq;
    const d = deferred();
    const p = { frame: { ...frame, req }, resolve: d.resolve, reject: d.reject, timer: null, kind, room, timeoutMs, inFlight: false };
    this._pending.set(req, p);
    if (this.isOpen) this._transmit(req, p);
    return d.promise;
  }

  _transmit(req, p) {
    if (!this._sendRaw(p.frame)) return;
    p.inFlight = true;
    clearTimeout(p.timer);
    p.timer = setTimeout(() => {
      if (!this._pending.has(req)) return;
      this._pending.delete(req);
      if (p.kind === 'join') {
        // No `joined` in time: ask again (the room stays wanted).
        const r = this._rooms.get(p.room);
        if (r && !r.joined && this.isOpen) this._sendJoin(r);
        return;
      }
      p.reject(new ChatError('timeout', `no answer to ${p.kind} in ${p.timeoutMs} ms`));
    }, p.timeoutMs);
  }

  /** Application-level ping; resolves with the round-trip time in ms. */
  async ping() {
    const t0 = Date.now();
    await this._request({ type: 'ping' }, { kind: 'ping', timeoutMs: this.opts.pongTimeoutMs });
    return Date.now() - t0;
  }

  /**
   * Page through stored messages. `{ before }` or `{ after }` (exclusive seqs) or neither for the
   * newest; `limit` ≤ 200. Resolves with `{ room, messages, has_more }`. Waits for the connection
   * when offline.
   */
  history(room, opts = {}) {
    return this._history(room, opts).then((res) => {
      this._verifyPage(room, res.messages || []);
      return res;
    });
  }

  _history(room, { before, after, limit } = {}) {
    const frame = { type: 'history', room };
    if (before !== undefined && before !== null) frame.before = before;
    if (after !== undefined && after !== null) frame.after = after;
    if (limit !== undefined && limit !== null) frame.limit = limit;
    return this._request(frame, { kind: 'history', room });
  }

  // ---------------------------------------------------------------- rooms

  /**
   * Joins a room (and keeps it joined across reconnects). `since`: the last seq you already have;
   * the server replays everything after it. Without `since`, delivery starts after the room's
   * current `last_seq` (use history() for older messages). Resolves with the `joined` frame.
   */
  join(room, { since } = {}) {
    let r = this._rooms.get(room);
    if (!r) {
      r = {
        name: room, joined: false, lastSeq: null, buffer: new Map(), repairing: false,
        expectSeq: 0, checkTimer: null, joinWaiters: [], members: new Map(), lastJoined: null,
      };
      this._rooms.set(room, r);
    }
    if (since !== undefined && since !== null && r.lastSeq === null) r.lastSeq = since;
    const d = deferred();
    if (r.joined && r.lastJoined) d.resolve(r.lastJoined);
    else {
      r.joinWaiters.push(d);
      if (this.isOpen && !r.joinInFlight) this._sendJoin(r);
    }
    return d.promise;
  }

  _sendJoin(r) {
    const frame = { type: 'join', room: r.name };
    if (r.lastSeq !== null) frame.since = r.lastSeq;
    r.joinInFlight = true;
    const req = ++this._reqSeq;
    const p = { frame: { ...frame, req }, resolve: () => {}, reject: () => {}, timer: null, kind: 'join', room: r.name, timeoutMs: this.opts.requestTimeoutMs };
    this._pending.set(req, p);
    this._transmit(req, p);
  }

  _onJoined(f) {
    this._resolveReq(f);
    const r = this._rooms.get(f.room);
    if (!r) return;
    r.joinInFlight = false;
    const rejoin = r.lastSeq !== null;
    r.joined = true;
    r.lastJoined = f;
    r.members = new Map((f.members || []).map((u) => [u, 'online']));
    if (r.lastSeq === null) r.lastSeq = f.last_seq;
    else if (f.last_seq > r.lastSeq) this._expect(r, f.last_seq);
    this.emit('joined', { room: f.room, last_seq: f.last_seq, members: f.members || [], rejoin, since: rejoin ? r.lastSeq : null });
    for (const w of r.joinWaiters.splice(0)) w.resolve(f);
    // Sends that waited for this room.
    for (const e of this._outbox.values()) if (e.room === f.room && !e.inFlight) this._trySend(e);
  }

  /** Leaves a room; resolves with the `left` frame (or at once when offline). */
  async leave(room) {
    const r = this._rooms.get(room);
    this._rooms.delete(room);
    if (r) {
      clearTimeout(r.checkTimer);
      for (const w of r.joinWaiters.splice(0)) w.reject(new ChatError('left', `left ${room}`));
    }
    for (const e of [...this._outbox.values()]) if (e.room === room) this._failSend(e, new ChatError('left', `left ${room}`));
    if (!this.isOpen) return { type: 'left', room };
    return this._request({ type: 'leave', room }, { kind: 'leave', room });
  }

  /** The rooms this client keeps joined. */
  rooms() { return [...this._rooms.keys()]; }

  /** The last seq delivered in order for a room (null before the first join). */
  lastSeq(room) { return this._rooms.get(room)?.lastSeq ?? null; }

  /** Members of a room as a Map user -> 'online' | 'offline'. */
  members(room) { return new Map(this._rooms.get(room)?.members || []); }

  _onPresence(f) {
    const r = this._rooms.get(f.room);
    if (r) r.members.set(f.user, f.state);
    this.emit('presence', { room: f.room, user: f.user, state: f.state });
  }

  /** Sends a typing signal, at most once per `typingThrottleMs` per room. */
  typing(room) {
    const r = this._rooms.get(room);
    if (!r || !r.joined || !this.isOpen) return false;
    const now = Date.now();
    if (now - (this._lastTyping.get(room) || 0) < this.opts.typingThrottleMs) return false;
    this._lastTyping.set(room, now);
    return this._sendRaw({ type: 'typing', room });
  }

  // ---------------------------------------------------------------- ordered delivery

  _onMessage(f) {
    if (this._debug.dropMessages > 0) { this._debug.dropMessages--; this.emit('debug-dropped', f); return; }
    if (this._debug.duplicateMessages > 0) { this._debug.duplicateMessages--; this._accept(f); }
    this._accept(f);
  }

  _accept(f) {
    const r = this._rooms.get(f.room);
    if (!r || typeof f.seq !== 'number') return;
    const { type, req, ...m } = f;
    if (r.lastSeq === null) r.lastSeq = m.seq - 1;
    if (m.seq <= r.lastSeq || r.buffer.has(m.seq)) { this.stats.duplicatesDropped++; this.emit('duplicate', m); return; }
    r.buffer.set(m.seq, m);
    this._drain(r);
    if (r.buffer.size > 0 && !r.repairing) this._repair(r);
  }

  _drain(r) {
    while (r.buffer.has(r.lastSeq + 1)) {
      const m = r.buffer.get(r.lastSeq + 1);
      r.buffer.delete(m.seq);
      r.lastSeq = m.seq;
      this.emit('message', m);
      this._verify(r, m);
    }
  }

  // ---------------------------------------------------------------- message chain

  /**
   * Checks a delivered message against the room's chain as delivered, after the ones before it
   * (checks are asynchronous, so they are queued per room).
   */
  _verify(r, m) {
    const subtle = globalThis.crypto?.subtle;
    if (!subtle) return; // no Web Crypto (an insecure context): nothing to check with
    r.verifying = (r.verifying || Promise.resolve()).then(async () => {
      if (typeof m.digest !== 'string') { r.chainHead = null; return; }
      const failures = await checkChain(m, r.chainHead, subtle);
      if (!r.chainHead || m.seq > r.chainHead.seq) r.chainHead = { seq: m.seq, digest: m.digest, id: m.id };
      for (const f of failures) this._integrityFailure({ room: r.name, seq: m.seq, id: m.id, ...f, source: 'live' });
    }).catch((e) => console.error('chat-client: chain check failed', e));
  }

  /** Checks a history page: each message, and the links between consecutive ones. */
  async _verifyPage(room, messages) {
    const subtle = globalThis.crypto?.subtle;
    if (!subtle) return;
    let head = null;
    for (const m of messages) {
      const msg = { ...m, room };
      const failures = await checkChain(msg, head, subtle);
      for (const f of failures) this._integrityFailure({ room, seq: m.seq, id: m.id, ...f, source: 'history' });
      head = typeof m.digest === 'string' ? { seq: m.seq, digest: m.digest, id: m.id } : null;
    }
  }

  _integrityFailure(failure) {
    const key = `${failure.room}/${failure.seq}/${failure.kind}`;
    if (this._integrityKeys.has(key)) return;
    this._integrityKeys.add(key);
    this.stats.integrityFailures++;
    this.integrityFailures.push(failure);
    this.emit('integrity', failure);
  }

  /** After a joined/ack that tells the room has reached `seq`: check it arrives, else repair. */
  _expect(r, seq) {
    if (seq <= r.expectSeq) return;
    r.expectSeq = seq;
    clearTimeout(r.checkTimer);
    r.checkTimer = setTimeout(() => {
      if (this._rooms.get(r.name) === r && r.joined && !r.repairing && r.lastSeq < r.expectSeq) this._repair(r);
    }, this.opts.joinCheckMs);
  }

  async _repair(r) {
    if (r.repairing) return;
    r.repairing = true;
    const from = r.lastSeq;
    let fetched = 0;
    let fruitless = 0;
    this.emit('gap', { room: r.name, after: r.lastSeq, next: this._minBuffered(r) ?? r.expectSeq + 1 });
    try {
      while (this._rooms.get(r.name) === r) {
        const nextBuffered = this._minBuffered(r);
        const target = nextBuffered !== null ? nextBuffered - 1 : r.expectSeq;
        if (r.lastSeq >= target) break;
        const limit = Math.min(200, target - r.lastSeq);
        const before = r.lastSeq;
        const res = await this._history(r.name, { after: r.lastSeq, limit });
        for (const m of res.messages || []) {
          if (m.seq > r.lastSeq && !r.buffer.has(m.seq)) { r.buffer.set(m.seq, { ...m, room: r.name }); fetched++; }
        }
        this._drain(r);
        if (r.lastSeq === before) {
          if (++fruitless >= 3) {
            // The store does not have the missing seqs: do not stall the room forever.
            this.emit('gap-unrepaired', { room: r.name, after: r.lastSeq, next: this._minBuffered(r) });
            if (nextBuffered !== null) { r.lastSeq = nextBuffered - 1; this._drain(r); }
            else r.expectSeq = r.lastSeq;
            fruitless = 0;
          } else {
            await new Promise((res2) => setTimeout(res2, 300 * fruitless));
          }
        }
      }
    } catch (e) {
      // Timed out or left: try again on the next message, joined or ack.
      this.emit('error', e instanceof ChatError ? e : new ChatError('internal', String(e)));
    } finally {
      r.repairing = false;
    }
    if (fetched > 0 || r.lastSeq > from) {
      this.stats.gapRepairs++;
      this.stats.repairedMessages += fetched;
      this.emit('gap-repaired', { room: r.name, from: from + 1, to: r.lastSeq, fetched });
    }
    if (r.buffer.size > 0 && this._rooms.get(r.name) === r && r.joined) setTimeout(() => this._repair(r), 500);
  }

  _minBuffered(r) {
    let min = null;
    for (const s of r.buffer.keys()) if (min === null || s < min) min = s;
    return min;
  }

  // ---------------------------------------------------------------- sending

  /** A new client_msg_id; pass it to send() to control retries yourself. */
  newClientMsgId() { return newClientMsgId(); }

  /**
   * Posts a message. Resolves with the `ack` frame once it is stored; retries with the same
   * `client_msg_id` across timeouts, `unavailable`/`rate_limited` errors and reconnects; rejects
   * (ChatError) after `sendGiveUpMs` or on a permanent error. Calling send() again with the same
   * `clientMsgId` (e.g. a "Retry" button) re-sends it idempotently: the server stores it once.
   */
  send(room, body, { clientMsgId } = {}) {
    const id = clientMsgId || newClientMsgId();
    const existing = this._outbox.get(id);
    if (existing) return existing.promise;
    const d = deferred();
    const e = {
      room, body, clientMsgId: id, attempts: 0, req: null, inFlight: false, attemptTimer: null,
      promise: d.promise, resolve: d.resolve, reject: d.reject, startedAt: Date.now(),
    };
    this._outbox.set(id, e);
    this._lastTyping.delete(room); // a message ends a typing burst; the next keystroke signals again
    e.giveUpTimer = setTimeout(() => {
      this._failSend(e, new ChatError('timeout', `not stored after ${Math.round(this.opts.sendGiveUpMs / 1000)} s`));
    }, this.opts.sendGiveUpMs);
    this.emit('delivery', { room, clientMsgId: id, body, state: 'sending' });
    if (!this._rooms.has(room)) this.join(room).catch(() => {});
    this._trySend(e);
    return d.promise;
  }

  /** Messages not acked yet: [{ room, clientMsgId, body, attempts }]. */
  pendingSends() {
    return [...this._outbox.values()].map(({ room, clientMsgId, body, attempts }) => ({ room, clientMsgId, body, attempts }));
  }

  _trySend(e) {
    if (this._outbox.get(e.clientMsgId) !== e) return;
    const r = this._rooms.get(e.room);
    if (!this.isOpen || !r || !r.joined) { e.inFlight = false; return; } // resumes on joined
    e.req = ++this._reqSeq;
    this._sendReqs.set(e.req, e.clientMsgId);
    if (this._sendReqs.size > SEND_REQS_KEPT) this._sendReqs.delete(this._sendReqs.keys().next().value);
    if (e.attempts > 0) this.stats.sendRetries++;
    e.attempts++;
    const ok = this._sendRaw({ type: 'send', room: e.room, client_msg_id: e.clientMsgId, body: e.body, req: e.req });
    if (!ok) { e.inFlight = false; return; }
    e.inFlight = true;
    clearTimeout(e.attemptTimer);
    e.attemptTimer = setTimeout(() => { e.inFlight = false; this._trySend(e); }, this.opts.sendAttemptTimeoutMs);
  }

  /**
   * An error answering attempt `req` of send `clientMsgId`. The server answers each attempt,
   * so the answer to an earlier one can arrive after a resend (say `internal`, "whether the
   * message was stored is not known yet", given by the send's 5 s deadline but held up in a
   * socket or a busy gateway) or after the ack: a retryable error is then overtaken and dropped,
   * not shown; a permanent one still fails a send not yet acked.
   */
  _onSendAttemptError(clientMsgId, req, err) {
    const e = this._outbox.get(clientMsgId);
    if (e && e.req === req) return this._onSendError(e, err);
    if (RETRYABLE_SEND_ERRORS.has(err.code)) { this.stats.staleSendErrors++; return; }
    if (e) return this._onSendError(e, err);
    this.emit('error', err);
  }

  _onSendError(e, err) {
    clearTimeout(e.attemptTimer);
    e.inFlight = false;
    switch (err.code) {
      case 'unavailable':
      case 'rate_limited':
      case 'internal': { // RETRYABLE_SEND_ERRORS
        const delay = backoffDelay(e.attempts - 1, this.opts.backoff);
        this.emit('delivery', { room: e.room, clientMsgId: e.clientMsgId, body: e.body, state: 'sending', retryInMs: delay, error: err });
        e.attemptTimer = setTimeout(() => this._trySend(e), delay);
        return;
      }
      case 'not_joined': {
        const r = this._rooms.get(e.room);
        if (r) { r.joined = false; if (!r.joinInFlight) this._sendJoin(r); }
        return; // resent on joined
      }
      default:
        this._failSend(e, err);
    }
  }

  _onAck(f) {
    this._resolveReq(f);
    const e = this._outbox.get(f.client_msg_id);
    const r = this._rooms.get(f.room);
    if (r && r.lastSeq !== null && f.seq > r.lastSeq) this._expect(r, f.seq);
    if (!e || e.room !== f.room) {
      // A late ack for a send we gave up on: the message is stored after all.
      this.emit('delivery', { room: f.room, clientMsgId: f.client_msg_id, state: 'stored', ack: f, late: true });
      return;
    }
    clearTimeout(e.attemptTimer);
    clearTimeout(e.giveUpTimer);
    this._outbox.delete(e.clientMsgId);
    this.emit('delivery', { room: e.room, clientMsgId: e.clientMsgId, body: e.body, state: 'stored', ack: f });
    e.resolve(f);
  }

  _failSend(e, err) {
    if (this._outbox.get(e.clientMsgId) !== e) return;
    clearTimeout(e.attemptTimer);
    clearTimeout(e.giveUpTimer);
    this._outbox.delete(e.clientMsgId);
    this.emit('delivery', { room: e.room, clientMsgId: e.clientMsgId, body: e.body, state: 'failed', error: err });
    e.reject(err);
  }

  // ---------------------------------------------------------------- debugging hooks

  /**
   * Fault injection for tests and debugging: drop the next `n` incoming `message` frames as if
   * the network had lost them (the client must notice the gap and repair it from history).
   */
  debugDropMessages(n = 1) { this._debug.dropMessages += n; }

  /** Fault injection: deliver the next `n` incoming `message` frames twice. */
  debugDuplicateMessages(n = 1) { this._debug.duplicateMessages += n; }

  /** Fault injection: drop the socket without a close handshake, as a network failure would. */
  debugDropConnection() { if (this._ws) this._drop(4002, 'dropped for debugging'); }
}
