// How the client takes the server's answers to a send that it tried more than once. The
// server answers every attempt, so an answer to an earlier attempt can arrive after a resend or
// after the ack (a gateway answers `internal`, "not known yet", at the send's 5 s deadline,
// later still for a client behind a slow socket: docs/protocol.md). Runs in Node against a
// scripted socket, no browser and no server: the timing is the test's to choose.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { ChatClient } from '../static/chat-client.js';

/** A WebSocket stand-in whose server side is the test: it records frames and answers them. */
class ScriptedSocket {
  static last = null;
  constructor() {
    this.readyState = 0;
    this.sent = [];
    ScriptedSocket.last = this;
    setTimeout(() => { this.readyState = 1; this.onopen?.(); }, 0);
  }
  send(text) {
    const frame = JSON.parse(text);
    this.sent.push(frame);
    if (frame.type === 'hello') this.answer({ type: 'welcome', user: frame.user, session: 's-1', gateway: 'gw-test' });
    if (frame.type === 'join') this.answer({ type: 'joined', room: frame.room, last_seq: 0, members: ['alice'], req: frame.req });
  }
  close() { this.readyState = 3; }
  answer(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  sends() { return this.sent.filter((f) => f.type === 'send'); }
}

/** A client on a scripted socket, joined to `room`, resending after `attemptMs`. */
async function joinedClient(room, attemptMs) {
  const client = new ChatClient({
    url: 'ws://test/ws', user: 'alice', WebSocket: ScriptedSocket, pingIntervalMs: 0,
    sendAttemptTimeoutMs: attemptMs, sendGiveUpMs: 30_000, requestTimeoutMs: 1_000,
  });
  const errors = [];
  client.on('error', (e) => errors.push(e));
  await client.connect();
  await client.join(room);
  return { client, socket: ScriptedSocket.last, errors };
}

async function until(check, what) {
  const start = Date.now();
  while (!check()) {
    if (Date.now() - start > 5_000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const ack = (send, seq) => ({
  type: 'ack', room: send.room, client_msg_id: send.client_msg_id, id: `m-${seq}`, seq, ts: 1, req: send.req,
});

describe('answers to a send tried more than once', () => {
  it('an error for an attempt already overtaken by a resend is dropped, and the ack still settles the send', async () => {
    const { client, socket, errors } = await joinedClient('general', 50);
    const stored = client.send('general', 'hello');
    await until(() => socket.sends().length >= 2, 'a resend');
    const [first, second] = socket.sends();
    assert.equal(first.client_msg_id, second.client_msg_id, 'a resend keeps the client_msg_id');
    assert.notEqual(first.req, second.req);
    socket.answer({ type: 'error', code: 'internal', message: 'whether the message was stored is not known', req: first.req });
    socket.answer(ack(second, 1));
    assert.equal((await stored).seq, 1);
    assert.deepEqual(errors, [], 'no error surfaced for the overtaken attempt');
    assert.equal(client.stats.staleSendErrors, 1);
    client.close();
  });

  it('an error that arrives after the ack is dropped too', async () => {
    const { client, socket, errors } = await joinedClient('general', 50);
    const stored = client.send('general', 'hello');
    await until(() => socket.sends().length >= 2, 'a resend');
    const [first, second] = socket.sends();
    socket.answer(ack(second, 7));
    await stored;
    socket.answer({ type: 'error', code: 'unavailable', message: 'not stored', req: first.req });
    assert.deepEqual(errors, []);
    assert.deepEqual(client.pendingSends(), []);
    client.close();
  });

  it('the answer to the latest attempt still decides: a permanent error fails the send', async () => {
    const { client, socket, errors } = await joinedClient('general', 10_000);
    const stored = client.send('general', 'x'.repeat(10));
    await until(() => socket.sends().length >= 1, 'the send');
    const [only] = socket.sends();
    socket.answer({ type: 'error', code: 'too_large', message: 'body too large', req: only.req });
    await assert.rejects(stored, (e) => e.code === 'too_large');
    assert.deepEqual(errors, [], 'a send error is the send\'s, not a connection error');
    client.close();
  });

  it('a retryable error for the latest attempt sends it again with the same client_msg_id', async () => {
    const { client, socket } = await joinedClient('general', 10_000);
    const stored = client.send('general', 'hello');
    await until(() => socket.sends().length >= 1, 'the send');
    const [first] = socket.sends();
    socket.answer({ type: 'error', code: 'internal', message: 'not known', req: first.req });
    await until(() => socket.sends().length >= 2, 'the retry after backoff');
    const second = socket.sends()[1];
    assert.equal(second.client_msg_id, first.client_msg_id);
    socket.answer(ack(second, 3));
    assert.equal((await stored).seq, 3);
    client.close();
  });
});
