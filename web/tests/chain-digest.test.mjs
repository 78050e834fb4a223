// The browser client's message-chain digest agrees with the server's (the known answer of
// docs/protocol.md and protocol/src/chain.rs), and checkChain tells altered from forked. Runs in
// Node (its Web Crypto), no browser.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { CHAIN_GENESIS, chainDigest, checkChain } from '../static/chat-client.js';

const KNOWN = {
  room: 'general', seq: 1, id: '00000000-0000-0000-0000-000000000000', user: 'alice', ts: 0,
  client_msg_id: 'c-1', body: 'hello',
};

async function chained(n) {
  const out = [];
  let prev = CHAIN_GENESIS;
  for (let seq = 1; seq <= n; seq++) {
    const m = { ...KNOWN, seq, client_msg_id: `c-${seq}`, body: `line one ${seq}\nline two ✓`, prev };
    m.digest = await chainDigest(prev, m);
    prev = m.digest;
    out.push(m);
  }
  return out;
}

describe('chain digests in the client', () => {
  it('match the protocol\'s known answer', async () => {
    assert.equal(await chainDigest(CHAIN_GENESIS, KNOWN), '8c284bd8e436b55c739da5b68260e557be029824d5a4a1fd08d27b98eaa1f857');
  });

  it('pass an intact chain and name an altered message and a fork', async () => {
    const [first, second, third] = await chained(3);
    const head = (m) => ({ seq: m.seq, digest: m.digest, id: m.id });
    assert.deepEqual(await checkChain(second, head(first)), []);
    const altered = await checkChain({ ...second, body: 'edited' }, head(first));
    assert.deepEqual(altered.map((f) => f.kind), ['altered']);
    const forged = { ...second, body: 'forged' };
    forged.digest = await chainDigest(forged.prev, forged);
    assert.deepEqual(await checkChain(forged, head(first)), [], 'a competent liar passes the self-check');
    const fork = await checkChain(third, head(forged));
    assert.deepEqual(fork.map((f) => [f.kind, f.expected, f.got]), [['fork', forged.digest, second.digest]]);
    assert.deepEqual(await checkChain({ ...third, digest: undefined }, head(forged)), [], 'unchained: not checked');
  });
});
