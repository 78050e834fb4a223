// app.js — the chat page. All protocol work happens in chat-client.js; this file is the view.
//
// Safe rendering: every piece of text from the network (bodies, names, ids) goes into the DOM
// through textContent or attributes, never through innerHTML.
import { ChatClient, USER_RE, ROOM_RE, newClientMsgId } from './chat-client.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const STORE_KEY = 'chat.v1';
const TOKEN_KEY = 'chat.v1.token';
const HISTORY_PAGE = 50;
const TYPING_SHOW_MS = 5000;

/** Debug knobs from the query string (e.g. `?sendGiveUpMs=3000`); handy for tests. */
function numParam(name) {
  const v = Number(params.get(name));
  return Number.isFinite(v) && v > 0 ? v : undefined;
}

const app = {
  client: null,
  me: null,
  rooms: new Map(), // name -> RoomView
  active: null,
};
// Exposed for debugging in the console and for the end-to-end tests.
window.chatApp = app;

const els = {
  signin: $('signin'), signinForm: $('signin-form'), signinName: $('signin-name'),
  signinToken: $('signin-token'), signinError: $('signin-error'), tokenDetails: $('token-details'),
  app: $('app'), roomTitle: $('room-title'), connText: $('conn-text'), conn: $('conn'),
  reconnectNow: $('reconnect-now'), me: $('me'), signout: $('signout'),
  drawerToggle: $('drawer-toggle'), sidebar: $('sidebar'), scrim: $('scrim'),
  joinForm: $('join-form'), joinRoom: $('join-room'), roomList: $('room-list'),
  memberList: $('member-list'), log: $('log'), listSlot: $('list-slot'), loadOlder: $('load-older'),
  historyStatus: $('history-status'), emptyState: $('empty-state'), typing: $('typing'),
  composer: $('composer'), input: $('composer-input'), send: $('send'),
  infoDialog: $('info-dialog'), infoList: $('info-list'), infoLink: $('info-link'),
  toasts: $('toasts'), gapRepairs: $('gap-repairs'), integrityBanner: $('integrity-banner'),
};

// ------------------------------------------------------------------ persistence

function loadStore() {
  try { return JSON.parse(localStorage.getItem(STORE_KEY)) || {}; } catch { return {}; }
}
function saveStore() {
  const data = { user: app.tokenMode ? null : app.me, rooms: [...app.rooms.keys()], active: app.active };
  try { localStorage.setItem(STORE_KEY, JSON.stringify(data)); } catch { /* private mode */ }
}

// ------------------------------------------------------------------ helpers

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function toast(text, kind = 'error') {
  const t = el('div', { class: `toast ${kind}`, text });
  els.toasts.append(t);
  setTimeout(() => t.remove(), 6000);
}

function fmtTime(ts) {
  const d = new Date(ts);
  const now = new Date();
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (d.toDateString() === now.toDateString()) return time;
  return `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${time}`;
}

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function lowerBound(arr, x) {
  let lo = 0, hi = arr.length;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (arr[mid] < x) lo = mid + 1; else hi = mid; }
  return lo;
}

function nearBottom() {
  const l = els.log;
  return l.scrollHeight - l.scrollTop - l.clientHeight < 60;
}
function scrollToBottom() { els.log.scrollTop = els.log.scrollHeight; }

// ------------------------------------------------------------------ rooms and messages

function makeRoom(name) {
  return {
    name,
    list: el('ol', { class: 'messages', 'aria-label': `Messages in ${name}` }),
    bySeq: new Map(),
    seqs: [],
    byCmid: new Map(),
    loaded: false,
    loading: false,
    hasMoreOlder: false,
    loadingOlder: false,
    members: new Map(),
    typing: new Map(),
    unread: 0,
    scrollTop: null,
    atBottom: true,
    joined: false,
    integrity: new Set(), // seqs that failed (or sit next to a failure of) the message-chain check
  };
}

const STATE_TEXT = { sending: 'sending', stored: 'stored', failed: 'failed' };

function renderItem(room, item) {
  let li = item.el;
  if (!li) {
    li = el('li', { class: 'msg' });
    item.el = li;
    item.parts = {
      avatar: el('span', { class: 'avatar', 'aria-hidden': 'true' }),
      sender: el('span', { class: 'sender' }),
      time: el('time', { class: 'time' }),
      status: el('span', { class: 'status' }),
      info: el('button', { class: 'icon-button info-btn', type: 'button', 'aria-label': 'Message info', title: 'Message info', text: 'i' }),
      body: el('p', { class: 'body' }),
      retry: el('button', { class: 'retry', type: 'button', text: 'Retry' }),
      error: el('span', { class: 'send-error' }),
      integrity: el('p', { class: 'integrity-warning', text: '⚠ this message failed its integrity check' }),
    };
    const p = item.parts;
    p.info.addEventListener('click', () => showInfo(room, item));
    p.retry.addEventListener('click', () => retrySend(room, item));
    li.append(
      p.avatar,
      el('div', { class: 'msg-main' },
        el('div', { class: 'meta' }, p.sender, p.time, p.status, p.info),
        p.body,
        el('div', { class: 'failed-row' }, p.error, p.retry)),
    );
  }
  const p = item.parts;
  const own = item.user === app.me;
  li.classList.toggle('own', own);
  li.classList.toggle('unsequenced', item.seq == null);
  li.dataset.seq = item.seq ?? '';
  li.dataset.state = item.state || '';
  if (item.id) li.dataset.id = item.id;
  p.avatar.textContent = (item.user || '?').slice(0, 1).toUpperCase();
  p.avatar.style.setProperty('--h', hue(item.user || '?'));
  p.sender.textContent = item.user;
  if (item.ts) {
    p.time.textContent = fmtTime(item.ts);
    p.time.dateTime = new Date(item.ts).toISOString();
    p.time.title = new Date(item.ts).toLocaleString();
  }
  // Bodies are text, never HTML.
  p.body.textContent = item.body;
  p.status.textContent = own && item.state ? STATE_TEXT[item.state] : '';
  p.status.hidden = !(own && item.state);
  p.status.className = `status ${item.state || ''}`;
  // In the DOM only when it applies (a hidden copy would still match text searches).
  const flagged = room.integrity.has(item.seq);
  if (flagged && !p.integrity.isConnected) p.body.after(p.integrity);
  else if (!flagged) p.integrity.remove();
  li.classList.toggle('integrity-failed', flagged);
  p.retry.hidden = item.state !== 'failed';
  p.error.textContent = item.state === 'failed' && item.error ? `Not sent: ${item.error}` : '';
  p.error.parentElement.hidden = item.state !== 'failed';
}

function placeItem(room, item) {
  if (item.seq == null) { room.list.append(item.el); return; }
  const i = lowerBound(room.seqs, item.seq);
  room.seqs.splice(i, 0, item.seq);
  const next = room.seqs[i + 1];
  const ref = next !== undefined ? room.bySeq.get(next)?.el : room.list.querySelector(':scope > li.unsequenced');
  room.list.insertBefore(item.el, ref || null);
}

/** Adds a stored message (live, replayed or from history); returns true when it was new. */
function addStored(room, m) {
  const existing = room.bySeq.get(m.seq);
  if (existing) {
    // Same message seen again (e.g. history overlapping live): fill in what we lacked.
    if (!existing.traceId && m.trace_id) { existing.traceId = m.trace_id; }
    if (!existing.id && m.id) existing.id = m.id;
    return false;
  }
  let item = m.user === app.me && m.client_msg_id ? room.byCmid.get(m.client_msg_id) : null;
  // The sender's own message, not acked yet: it keeps the words she typed, as it does when the
  // ack comes first (a copy altered on the way is flagged by the integrity check, not shown).
  let typed = null;
  if (item && item.seq == null) {
    typed = item.body;
    item.el.remove();
  } else {
    item = { user: m.user, clientMsgId: m.client_msg_id };
    if (m.user === app.me && m.client_msg_id) room.byCmid.set(m.client_msg_id, item);
  }
  Object.assign(item, {
    seq: m.seq, id: m.id, user: m.user, body: typed ?? m.body, ts: m.ts, traceId: m.trace_id,
    state: m.user === app.me ? 'stored' : null, error: null,
  });
  room.bySeq.set(m.seq, item);
  renderItem(room, item);
  placeItem(room, item);
  return true;
}

/**
 * A message failed its message-chain check (chat-client.js): say so above the log, naming room
 * and seq, and mark the message (for a fork, the one before it too: one of the two is not what
 * was stored). The message stays shown.
 */
function onIntegrity(f) {
  const why = f.kind === 'fork'
    ? `it does not chain to message #${f.seq - 1} as received, so two versions of #${f.seq - 1} exist`
    : 'its contents do not match its digest: it was altered after it was stored';
  const line = el('p', { text: `⚠ Message #${f.seq} in #${f.room} failed its integrity check: ${why}.` });
  line.dataset.room = f.room;
  line.dataset.seq = String(f.seq);
  line.dataset.kind = f.kind;
  els.integrityBanner.append(line);
  while (els.integrityBanner.childElementCount > 5) els.integrityBanner.firstElementChild.remove();
  els.integrityBanner.hidden = false;
  const room = app.rooms.get(f.room);
  if (!room) return;
  for (const seq of f.kind === 'fork' ? [f.seq - 1, f.seq] : [f.seq]) {
    room.integrity.add(seq);
    const item = room.bySeq.get(seq);
    if (item) renderItem(room, item);
  }
}

function onAckDelivered(room, ack) {
  let item = room.byCmid.get(ack.client_msg_id);
  if (!item) return;
  if (item.seq == null) {
    if (room.bySeq.has(ack.seq)) { item.el.remove(); room.byCmid.set(ack.client_msg_id, room.bySeq.get(ack.seq)); item = room.bySeq.get(ack.seq); }
    else {
      item.el.remove();
      Object.assign(item, { seq: ack.seq, id: ack.id, ts: ack.ts });
      room.bySeq.set(ack.seq, item);
      renderItem(room, item);
      placeItem(room, item);
    }
  }
  item.state = 'stored';
  item.error = null;
  renderItem(room, item);
}

function updateEmpty() {
  const room = app.rooms.get(app.active);
  if (!room) {
    els.emptyState.textContent = 'Join a room to start chatting.';
    els.emptyState.hidden = false;
  } else {
    els.emptyState.textContent = room.loaded ? `No messages in #${room.name} yet. Say hello!` : 'Loading…';
    els.emptyState.hidden = room.list.childElementCount > 0;
  }
}

function updateHistoryControls() {
  const room = app.rooms.get(app.active);
  if (!room) { els.loadOlder.hidden = true; els.historyStatus.textContent = ''; return; }
  els.loadOlder.hidden = !room.hasMoreOlder || room.loadingOlder;
  if (room.loadingOlder) els.historyStatus.textContent = 'Loading older messages…';
  else if (room.loaded && !room.hasMoreOlder && room.seqs.length > 0) els.historyStatus.textContent = `This is the beginning of #${room.name}.`;
  else els.historyStatus.textContent = '';
}

async function loadInitial(room, lastSeq) {
  if (room.loaded || room.loading) return;
  room.loading = true;
  try {
    if (lastSeq > 0) {
      const res = await app.client.history(room.name, { before: lastSeq + 1, limit: HISTORY_PAGE });
      const wasBottom = app.active === room.name ? nearBottom() : true;
      for (const m of res.messages) addStored(room, { ...m, room: room.name });
      room.hasMoreOlder = Boolean(res.has_more) && (room.seqs[0] ?? 1) > 1;
      if (app.active === room.name && wasBottom) scrollToBottom();
    }
    room.loaded = true;
  } catch (e) {
    toast(`Could not load the history of #${room.name}: ${e.message}`);
  } finally {
    room.loading = false;
  }
  if (app.active === room.name) { updateEmpty(); updateHistoryControls(); scrollToBottom(); fillViewport(room); }
}

/** Infinite scroll: older pages with `history before`. */
async function loadOlder(room) {
  if (!room || !room.hasMoreOlder || room.loadingOlder || !room.loaded) return;
  const before = room.seqs[0];
  if (!before || before <= 1) { room.hasMoreOlder = false; updateHistoryControls(); return; }
  room.loadingOlder = true;
  updateHistoryControls();
  try {
    const res = await app.client.history(room.name, { before, limit: HISTORY_PAGE });
    const active = app.active === room.name;
    const prevHeight = els.log.scrollHeight;
    const prevTop = els.log.scrollTop;
    for (const m of res.messages) addStored(room, { ...m, room: room.name });
    room.hasMoreOlder = Boolean(res.has_more) && res.messages.length > 0 && room.seqs[0] > 1;
    if (active) els.log.scrollTop = prevTop + (els.log.scrollHeight - prevHeight);
  } catch (e) {
    toast(`Could not load older messages: ${e.message}`);
  } finally {
    room.loadingOlder = false;
  }
  if (app.active === room.name) { updateHistoryControls(); updateEmpty(); fillViewport(room); }
}

/** When the messages do not fill the log yet, there is nothing to scroll: load more now. */
function fillViewport(room) {
  if (app.active !== room.name) return;
  if (room.hasMoreOlder && !room.loadingOlder && els.log.scrollHeight <= els.log.clientHeight + 10) loadOlder(room);
}

function renderRoomList() {
  els.roomList.replaceChildren(...[...app.rooms.values()].map((room) => {
    const current = room.name === app.active;
    const open = el('button', {
      class: 'room-button', type: 'button', 'aria-current': current ? 'true' : null,
      onclick: () => { switchRoom(room.name); closeDrawer(); },
    }, el('span', { class: 'hash', 'aria-hidden': 'true', text: '#' }), el('span', { text: room.name }));
    if (room.unread > 0) open.append(el('span', { class: 'badge', text: String(room.unread), 'aria-label': `${room.unread} unread` }));
    const leave = el('button', {
      class: 'icon-button leave', type: 'button', 'aria-label': `Leave ${room.name}`, title: `Leave #${room.name}`, text: '×',
      onclick: () => leaveRoom(room.name),
    });
    return el('li', { class: current ? 'current' : '' }, open, leave);
  }));
}

function renderMembers() {
  const room = app.rooms.get(app.active);
  if (!room) { els.memberList.replaceChildren(); return; }
  const entries = [...room.members.entries()].sort((a, b) => (a[1] === b[1] ? a[0].localeCompare(b[0]) : a[1] === 'online' ? -1 : 1));
  els.memberList.replaceChildren(...entries.map(([user, state]) => el('li', { class: `member ${state}`, dataset: { user } },
    el('span', { class: 'dot', 'aria-hidden': 'true' }),
    el('span', { class: 'name', text: user === app.me ? `${user} (you)` : user }),
    el('span', { class: 'state', text: state }))));
}

function renderTyping() {
  const room = app.rooms.get(app.active);
  const users = room ? [...room.typing.keys()] : [];
  let text = '';
  if (users.length === 1) text = `${users[0]} is typing…`;
  else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing…`;
  else if (users.length > 2) text = `${users.length} people are typing…`;
  els.typing.textContent = text;
}

function switchRoom(name) {
  const prev = app.rooms.get(app.active);
  if (prev) { prev.atBottom = nearBottom(); prev.scrollTop = els.log.scrollTop; }
  app.active = name;
  const room = app.rooms.get(name);
  els.listSlot.replaceChildren(...(room ? [room.list] : []));
  els.roomTitle.textContent = room ? `#${room.name}` : 'Chat';
  document.title = room ? `#${room.name} · Chat` : 'Chat';
  if (room) {
    room.unread = 0;
    if (room.atBottom || room.scrollTop === null) scrollToBottom(); else els.log.scrollTop = room.scrollTop;
  }
  els.input.disabled = !room;
  els.send.disabled = !room;
  renderRoomList();
  renderMembers();
  renderTyping();
  updateEmpty();
  updateHistoryControls();
  refreshDebug();
  saveStore();
}

function joinRoom(name, { activate = true } = {}) {
  if (!ROOM_RE.test(name)) {
    toast('A room name is 1–64 letters, digits, "_" or "-".');
    return;
  }
  if (!app.rooms.has(name)) {
    const room = makeRoom(name);
    app.rooms.set(name, room);
    app.client.join(name).catch((e) => {
      if (app.rooms.get(name) !== room) return;
      toast(`Could not join #${name}: ${e.code === 'forbidden' ? 'not allowed for this token' : e.message}`);
      removeRoom(name);
    });
  }
  if (activate) switchRoom(name); else renderRoomList();
  saveStore();
}

function removeRoom(name) {
  app.rooms.delete(name);
  if (app.active === name) switchRoom(app.rooms.keys().next().value ?? null);
  else renderRoomList();
  saveStore();
}

function leaveRoom(name) {
  app.client.leave(name).catch(() => {});
  removeRoom(name);
}

// ------------------------------------------------------------------ sending

function sendMessage() {
  const room = app.rooms.get(app.active);
  const body = els.input.value.replace(/^\s*\n|\s+$/g, '');
  if (!room || body.trim() === '') return;
  const cmid = newClientMsgId();
  const item = { seq: null, clientMsgId: cmid, user: app.me, body, ts: Date.now(), state: 'sending' };
  room.byCmid.set(cmid, item);
  renderItem(room, item);
  placeItem(room, item);
  els.input.value = '';
  autosize();
  updateEmpty();
  scrollToBottom();
  app.client.send(room.name, body, { clientMsgId: cmid }).catch(() => { /* shown via 'delivery' */ });
}

function retrySend(room, item) {
  if (item.state !== 'failed') return;
  item.state = 'sending';
  item.error = null;
  renderItem(room, item);
  app.client.send(room.name, item.body, { clientMsgId: item.clientMsgId }).catch(() => {});
}

function onDelivery(d) {
  const room = app.rooms.get(d.room);
  if (!room) return;
  const item = room.byCmid.get(d.clientMsgId);
  if (d.state === 'stored') { onAckDelivered(room, d.ack); return; }
  if (!item || item.seq != null) return;
  const follow = room.name === app.active && nearBottom();
  item.state = d.state;
  item.error = d.state === 'failed' ? (d.error?.message || 'failed') : null;
  renderItem(room, item);
  if (follow) scrollToBottom();
}

// ------------------------------------------------------------------ info dialog

function showInfo(room, item) {
  const rows = [
    ['Room', room.name],
    ['Seq', item.seq ?? '— (not stored yet)'],
    ['ID', item.id ?? '—'],
    ['Trace ID', item.traceId ?? '—'],
    ['Client message ID', item.clientMsgId ?? '—'],
    ['Sender', item.user],
    ['Time', item.ts ? new Date(item.ts).toISOString() : '—'],
  ];
  if (item.user === app.me && item.state) rows.push(['Delivery', item.state]);
  els.infoList.replaceChildren(...rows.map(([k, v]) => el('div', {}, el('dt', { text: k }), el('dd', { text: String(v) }))));
  if (item.id) {
    const href = `/debug/messages/${encodeURIComponent(item.id)}`;
    els.infoLink.href = href;
    els.infoLink.textContent = `Message journey: ${href}`;
    els.infoLink.hidden = false;
  } else {
    els.infoLink.hidden = true;
  }
  els.infoDialog.showModal();
}

// ------------------------------------------------------------------ connection status

function setConn(state, detail = {}) {
  const text = {
    idle: 'offline', connecting: 'connecting…', open: 'connected', reconnecting: 'reconnecting…', closed: 'disconnected',
  }[state] || state;
  els.connText.textContent = text;
  els.conn.dataset.state = state;
  els.app.dataset.conn = state;
  els.reconnectNow.hidden = state !== 'reconnecting';
  els.conn.title = state === 'reconnecting' && detail.delayMs !== undefined
    ? `Connection lost (attempt ${detail.attempt}); next try in ${(detail.delayMs / 1000).toFixed(1)} s` : '';
  refreshDebug();
}

function refreshDebug() {
  const c = app.client;
  if (!c) return;
  $('dbg-state').textContent = c.state;
  $('dbg-gateway').textContent = c.gateway ?? '–';
  $('dbg-session').textContent = c.session ?? '–';
  $('dbg-session').title = c.session ?? '';
  const ls = app.active ? c.lastSeq(app.active) : null;
  $('dbg-lastseq').textContent = ls ?? '–';
  $('dbg-reconnects').textContent = String(c.stats.reconnects);
  $('dbg-retries').textContent = String(c.stats.sendRetries);
  $('dbg-dups').textContent = String(c.stats.duplicatesDropped);
  els.gapRepairs.textContent = `Gap repairs: ${c.stats.gapRepairs}`;
  els.gapRepairs.title = `${c.stats.repairedMessages} message(s) fetched from history to fill gaps`;
}

// ------------------------------------------------------------------ sign in / out

function startSession({ user, token }) {
  app.tokenMode = Boolean(token);
  app.me = token ? null : user;
  const client = new ChatClient({
    user, token,
    sendGiveUpMs: numParam('sendGiveUpMs'),
    backoff: numParam('backoffMaxMs') ? { maxMs: numParam('backoffMaxMs') } : undefined,
  });
  app.client = client;

  client.on('state', ({ state, ...detail }) => setConn(state, detail));
  client.on('reconnecting', (d) => setConn('reconnecting', d));
  client.on('welcome', (w) => {
    app.me = w.user;
    els.me.textContent = w.user;
    els.me.title = `Signed in as ${w.user}`;
    if (app.tokenMode) { try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* ignore */ } }
    saveStore();
    for (const room of app.rooms.values()) for (const item of room.bySeq.values()) if (item.user === w.user && !item.state) { item.state = 'stored'; renderItem(room, item); }
  });
  client.on('fatal', (err) => {
    try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* ignore */ }
    endSession();
    let why = err.message;
    if (err.code === 'unauthorized') {
      if (/expired/.test(err.message)) why = 'Your token expired: sign in with a fresh token.';
      else why = app.tokenMode ? 'The server refused this token.' : 'This server needs a token: sign in with a token.';
    }
    showSignin(why);
    if (err.code === 'unauthorized' && !app.tokenMode) els.tokenDetails.open = true;
  });
  client.on('joined', ({ room: name, last_seq: lastSeq, members, rejoin }) => {
    const room = app.rooms.get(name);
    if (!room) return;
    room.joined = true;
    for (const u of room.members.keys()) room.members.set(u, 'offline');
    for (const u of members) room.members.set(u, 'online');
    if (app.me) room.members.set(app.me, 'online');
    if (!rejoin || !room.loaded) loadInitial(room, lastSeq);
    if (name === app.active) renderMembers();
    refreshDebug();
  });
  client.on('message', (m) => {
    const room = app.rooms.get(m.room);
    if (!room) return;
    const active = m.room === app.active;
    const wasBottom = active && nearBottom();
    const isNew = addStored(room, m);
    if (room.typing.has(m.user)) { clearTimeout(room.typing.get(m.user)); room.typing.delete(m.user); if (active) renderTyping(); }
    if (active) {
      if (wasBottom || m.user === app.me) scrollToBottom();
      updateEmpty();
    } else if (isNew && m.user !== app.me) {
      room.unread++;
      renderRoomList();
    }
    refreshDebug();
  });
  client.on('delivery', onDelivery);
  client.on('presence', ({ room: name, user: u, state }) => {
    const room = app.rooms.get(name);
    if (!room) return;
    room.members.set(u, state);
    if (state === 'offline' && room.typing.has(u)) { clearTimeout(room.typing.get(u)); room.typing.delete(u); }
    if (name === app.active) { renderMembers(); renderTyping(); }
  });
  client.on('typing', ({ room: name, user: u }) => {
    const room = app.rooms.get(name);
    if (!room) return;
    clearTimeout(room.typing.get(u));
    room.typing.set(u, setTimeout(() => { room.typing.delete(u); if (name === app.active) renderTyping(); }, TYPING_SHOW_MS));
    if (name === app.active) renderTyping();
  });
  client.on('integrity', onIntegrity);
  client.on('gap-repaired', refreshDebug);
  client.on('duplicate', refreshDebug);
  client.on('error', (e) => {
    if (['rate_limited', 'too_large', 'bad_request', 'internal', 'unavailable'].includes(e.code)) toast(`Server: ${e.message || e.code}`);
  });

  els.signin.hidden = true;
  els.app.hidden = false;
  els.me.textContent = user || '';
  setConn('connecting');
  client.connect().catch(() => { /* 'fatal' handles it */ });

  const saved = loadStore();
  const rooms = saved.user === user || app.tokenMode ? saved.rooms || [] : [];
  for (const r of rooms) if (ROOM_RE.test(r)) joinRoom(r, { activate: false });
  switchRoom(rooms.includes(saved.active) ? saved.active : rooms[0] ?? null);
  if (!app.active) els.joinRoom.focus(); else els.input.focus();
}

function endSession() {
  const c = app.client;
  app.client = null;
  c?.close();
  for (const room of app.rooms.values()) for (const t of room.typing.values()) clearTimeout(t);
  app.rooms.clear();
  app.active = null;
  els.listSlot.replaceChildren();
  els.integrityBanner.replaceChildren();
  els.integrityBanner.hidden = true;
}

function showSignin(error) {
  els.app.hidden = true;
  els.signin.hidden = false;
  els.signinError.hidden = !error;
  els.signinError.textContent = error || '';
  const saved = loadStore();
  if (saved.user && !els.signinName.value) els.signinName.value = saved.user;
  els.signinName.focus();
}

els.signinForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const user = els.signinName.value.trim();
  const token = els.signinToken.value.trim();
  if (!token && !USER_RE.test(user)) {
    els.signinError.hidden = false;
    els.signinError.textContent = 'A name is 1–64 letters, digits, ".", "_" or "-".';
    els.signinName.focus();
    return;
  }
  els.signinError.hidden = true;
  const saved = loadStore();
  if (!token && saved.user !== user) {
    // Another person on this browser: do not rejoin their rooms.
    try { localStorage.setItem(STORE_KEY, JSON.stringify({ user, rooms: [], active: null })); } catch { /* ignore */ }
  }
  startSession(token ? { token } : { user });
});

els.signout.addEventListener('click', () => {
  endSession();
  try { localStorage.removeItem(STORE_KEY); sessionStorage.removeItem(TOKEN_KEY); } catch { /* ignore */ }
  els.signinToken.value = '';
  showSignin();
});

// ------------------------------------------------------------------ composer, rooms, scrolling

els.joinForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const name = els.joinRoom.value.trim().replace(/^#/, '');
  if (!name) return;
  joinRoom(name);
  if (ROOM_RE.test(name)) { els.joinRoom.value = ''; closeDrawer(); els.input.focus(); }
});

els.composer.addEventListener('submit', (ev) => { ev.preventDefault(); sendMessage(); els.input.focus(); });

els.input.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && !ev.altKey && !ev.ctrlKey && !ev.metaKey) {
    ev.preventDefault();
    sendMessage();
  }
});

function autosize() {
  els.input.style.height = 'auto';
  els.input.style.height = `${Math.min(els.input.scrollHeight, 160)}px`;
}

els.input.addEventListener('input', () => {
  autosize();
  if (app.active && els.input.value.trim() !== '') app.client?.typing(app.active);
});

els.log.addEventListener('scroll', () => {
  if (els.log.scrollTop < 80) loadOlder(app.rooms.get(app.active));
}, { passive: true });

els.loadOlder.addEventListener('click', () => loadOlder(app.rooms.get(app.active)));
els.reconnectNow.addEventListener('click', () => app.client?.reconnectNow());

function closeDrawer() {
  document.body.classList.remove('drawer-open');
  els.drawerToggle.setAttribute('aria-expanded', 'false');
  els.scrim.hidden = true;
}
els.drawerToggle.addEventListener('click', () => {
  const open = !document.body.classList.contains('drawer-open');
  document.body.classList.toggle('drawer-open', open);
  els.drawerToggle.setAttribute('aria-expanded', String(open));
  els.scrim.hidden = !open;
  if (open) els.joinRoom.focus();
});
els.scrim.addEventListener('click', closeDrawer);
document.addEventListener('keydown', (ev) => {
  if (ev.key === 'Escape' && document.body.classList.contains('drawer-open')) { closeDrawer(); els.drawerToggle.focus(); }
});

// ------------------------------------------------------------------ start

(function boot() {
  const saved = loadStore();
  let token = null;
  try { token = sessionStorage.getItem(TOKEN_KEY); } catch { /* ignore */ }
  if (token) startSession({ token });
  else if (saved.user && USER_RE.test(saved.user)) startSession({ user: saved.user });
  else showSignin();
})();
