// Unit tests of quartchat.js's recipe against a fake server (node --test).
// The fake WebSocket records what the client sends; each test plays the
// server's part frame by frame, so every rule is checked on its own.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  QuartchatClient, backoffDelay, explainRoomId, explainSenderId, newClientMsgId,
} from "../../quartchat/static/quartchat.js";

class FakeServer {
  constructor() {
    this.sockets = [];
    const server = this;
    this.WebSocket = class {
      constructor(url) {
        this.url = new URL(url);
        this.readyState = 0;
        this.sent = [];
        this.closed = null;
        server.sockets.push(this);
        server._notify();
      }
      send(data) { assert.equal(this.readyState, 1, "send on a socket that is not open"); this.sent.push(JSON.parse(data)); server._notify(); }
      close(code = 1000, reason = "") { this.closed = { code, reason }; this.readyState = 3; }
    };
    this._waiters = [];
  }
  _notify() { for (const w of this._waiters.splice(0)) w(); }
  /** Wait (with a deadline) until predicate() holds. */
  async until(predicate, what = "condition", ms = 2000) {
    const deadline = Date.now() + ms;
    while (!predicate()) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => { this._waiters.push(r); setTimeout(r, 5); });
    }
  }
  get last() { return this.sockets[this.sockets.length - 1]; }
  /** Accept the newest socket and send welcome. */
  accept(sock = this.last, extra = {}) {
    sock.readyState = 1;
    sock.onopen?.();
    this.frame(sock, { type: "welcome", sender_id: sock.url.searchParams.get("sender_id") ?? "jwt-user",
                       connection_id: "c", server_id: "s", protocol: 1,
                       limits: { max_content: 4096, max_rooms: 100, rate_per_s: 20 }, ...extra });
  }
  frame(sock, f) { sock.onmessage?.({ data: JSON.stringify(f) }); }
  drop(sock = this.last, code = 1006) { sock.readyState = 3; sock.onclose?.({ code, reason: "" }); }
  refuse(sock = this.last) { this.drop(sock, 1006); }
}

function makeClient(server, extra = {}) {
  return new QuartchatClient({ url: "ws://fake/chat", senderId: "alice", WebSocket: server.WebSocket,
                               backoff: { initialMs: 5, maxMs: 20 }, retryBackoff: { initialMs: 10, maxMs: 40 }, tickMs: 5, pingIntervalMs: 0,
                               ...extra });
}

function collect(client, type) {
  const out = [];
  client.on(type, (d) => out.push(d));
  return out;
}

const msg = (room, seq, extra = {}) => ({ type: "message", room_id: room, seq, id: `id${seq}`,
  sender_id: "bob", content: `m${seq}`, sent_at: "2026-12-01T00:00:00.000Z", ...extra });

test("client_msg_id without randomUUID is random v4 from getRandomValues, not the clock", () => {
  const realNow = Date.now;
  Date.now = () => 1234;  // a frozen clock must not matter
  try {
    const c = { getRandomValues: (a) => globalThis.crypto.getRandomValues(a) };
    const ids = new Set(Array.from({ length: 1000 }, () => newClientMsgId(c)));
    assert.equal(ids.size, 1000);
    for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  } finally {
    Date.now = realNow;
  }
  assert.throws(() => newClientMsgId({}), /getRandomValues/);
});

test("backoff grows, is capped, and is jittered within [cap/2, cap]", () => {
  const o = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(0, o, () => 0), 50);
  assert.equal(backoffDelay(0, o, () => 1), 100);
  assert.equal(backoffDelay(3, o, () => 1), 800);
  assert.equal(backoffDelay(10, o, () => 1), 1000);
  assert.equal(backoffDelay(10, o, () => 0), 500);
  const seen = new Set(Array.from({ length: 50 }, () => backoffDelay(2, o)));
  assert.ok(seen.size > 10, "jitter spreads reconnects");
});

test("sender and room ids are explained before connecting", () => {
  assert.equal(explainSenderId("alice_1@x"), null);
  assert.equal(explainSenderId("bad name!"), "A name may use only letters A-Z a-z, digits and _ . @ : - (not: space !).");
  assert.match(explainSenderId(""), /required/);
  assert.match(explainSenderId("x".repeat(65)), /at most 64/);
  assert.match(explainRoomId("a@b"), /not: @/);
  const server = new FakeServer();
  assert.throws(() => makeClient(server, { senderId: "no spaces" }).connect(), /only letters/);
  assert.equal(server.sockets.length, 0, "nothing was opened");
});

test("joins with history first, then rejoins with since_seq = last seq seen after a drop", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { history: 20 });
  const messages = collect(client, "message");
  const recovered = collect(client, "recovered");
  client.join("r1");
  client.connect();
  await server.until(() => server.sockets.length === 1, "first socket");
  assert.equal(server.last.url.searchParams.get("sender_id"), "alice");
  server.accept();
  assert.deepEqual(server.last.sent, [{ action: "join", room_id: "r1", history: 20 }]);
  server.frame(server.last, { type: "joined", room_id: "r1", last_seq: 2, members: ["alice"] });
  server.frame(server.last, msg("r1", 1));
  server.frame(server.last, msg("r1", 2));
  server.frame(server.last, msg("r1", 2));  // a duplicate is never shown
  server.frame(server.last, msg("r1", 3));
  assert.deepEqual(messages.map((m) => [m.message.seq, m.replay]), [[1, true], [2, true], [3, false]]);

  server.drop(server.last, 1001);
  assert.equal(client.state, "waiting");
  await server.until(() => server.sockets.length === 2, "reconnect");
  server.accept();
  assert.deepEqual(server.last.sent, [{ action: "join", room_id: "r1", since_seq: 3 }]);
  server.frame(server.last, { type: "joined", room_id: "r1", last_seq: 5, members: ["alice", "bob"] });
  server.frame(server.last, msg("r1", 3));  // overlap: dropped
  server.frame(server.last, msg("r1", 4));
  server.frame(server.last, msg("r1", 5));
  assert.deepEqual(messages.map((m) => m.message.seq), [1, 2, 3, 4, 5]);
  assert.deepEqual(recovered, [{ roomId: "r1", count: 2, sinceSeq: 3 }]);
  client.close();
});

test("an empty room's rejoin asks since its last_seq, not for history again", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { history: 0 });
  client.join("r");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept();
  server.frame(server.last, { type: "joined", room_id: "r", last_seq: 7, members: [] });
  server.drop();
  await server.until(() => server.sockets.length === 2);
  server.accept();
  assert.deepEqual(server.last.sent, [{ action: "join", room_id: "r", since_seq: 7 }]);
  client.close();
});

test("close 4003 is final; 1008, 4008 and 1006 reconnect", async () => {
  for (const code of [1006, 1008, 4008, 1011]) {
    const server = new FakeServer();
    const client = makeClient(server);
    client.connect();
    await server.until(() => server.sockets.length === 1);
    server.accept();
    server.drop(server.last, code);
    await server.until(() => server.sockets.length === 2, `reconnect after ${code}`);
    client.close();
  }
  const server = new FakeServer();
  const client = makeClient(server);
  const states = collect(client, "state");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept();
  server.drop(server.last, 4003);
  assert.equal(client.state, "closed");
  await new Promise((r) => setTimeout(r, 100));  // several backoff periods: no new socket
  assert.equal(server.sockets.length, 1);
  assert.deepEqual(states.map((s) => s.state), ["connecting", "open", "closed"]);
});

test("a refused handshake is reported and retried with growing delays", async () => {
  const server = new FakeServer();
  const client = makeClient(server);
  const errors = collect(client, "error");
  const states = collect(client, "state");
  client.connect();
  for (let i = 1; i <= 3; i++) {
    await server.until(() => server.sockets.length === i);
    server.refuse();
  }
  assert.equal(errors.filter((e) => e.code === "handshake_refused").length, 3);
  const delays = states.filter((s) => s.state === "waiting").map((s) => s.attempt);
  assert.deepEqual(delays, [1, 2, 3]);
  client.close();
});

test("a post made while disconnected is sent after the rejoin, resent unchanged until acked", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { ackTimeoutMs: 30 });
  const changes = collect(client, "post");
  client.join("r");
  const post = client.post("r", "hello");  // not connected yet
  assert.equal(post.state, "pending");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept();
  assert.equal(server.last.sent.length, 1, "no post before joined");
  server.frame(server.last, { type: "joined", room_id: "r", last_seq: 0, members: ["alice"] });
  const first = server.last.sent[1];
  assert.deepEqual(first, { action: "message", room_id: "r", content: "hello", client_msg_id: post.clientMsgId });
  // No ack: resent after ackTimeoutMs with the same client_msg_id.
  await server.until(() => server.last.sent.length >= 3, "resend");
  assert.deepEqual(server.last.sent[2], first);
  // Dropped before the ack: resent on the next connection, still the same id.
  server.drop();
  await server.until(() => server.sockets.length === 2);
  server.accept();
  server.frame(server.last, { type: "joined", room_id: "r", last_seq: 1, members: ["alice"] });
  assert.deepEqual(server.last.sent[1], first);
  server.frame(server.last, { type: "ack", room_id: "r", seq: 1, id: "x1", client_msg_id: post.clientMsgId });
  assert.equal(post.state, "sent");
  assert.equal(post.seq, 1);
  assert.deepEqual(changes.map((c) => c.state), ["pending", "sent"]);
  assert.equal(client.posts.size, 0);
  client.close();
});

test("rate_limited and unavailable are retried later; too_large fails; failed posts can be retried", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { random: () => 0 });
  client.join("r");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept();
  server.frame(server.last, { type: "joined", room_id: "r", last_seq: 0, members: [] });
  const a = client.post("r", "a");
  const b = client.post("r", "b".repeat(5000));
  const sock = server.last;
  assert.equal(sock.sent.length, 3);
  server.frame(sock, { type: "error", code: "rate_limited", message: "slow down", action: "message",
                       room_id: "r", client_msg_id: a.clientMsgId });
  server.frame(sock, { type: "error", code: "too_large", message: "too big", action: "message",
                       room_id: "r", client_msg_id: b.clientMsgId });
  assert.equal(a.state, "pending");
  assert.equal(b.state, "failed");
  assert.equal(b.error.code, "too_large");
  await server.until(() => sock.sent.filter((f) => f.client_msg_id === a.clientMsgId).length === 2, "retry");
  server.frame(sock, { type: "error", code: "unavailable", message: "later", action: "message",
                       room_id: "r", client_msg_id: a.clientMsgId });
  await server.until(() => sock.sent.filter((f) => f.client_msg_id === a.clientMsgId).length === 3, "retry 2");
  server.frame(sock, { type: "ack", room_id: "r", seq: 1, id: "i", client_msg_id: a.clientMsgId });
  assert.equal(a.state, "sent");
  assert.ok(client.retry(b));
  assert.equal(b.state, "pending");
  await server.until(() => sock.sent.at(-1).client_msg_id === b.clientMsgId, "b resent (paced)");
  client.close();
});

test("five posts in one millisecond get five distinct ids", async () => {
  const server = new FakeServer();
  const noUuid = { getRandomValues: (x) => globalThis.crypto.getRandomValues(x) };
  const client = makeClient(server, { crypto: noUuid, now: () => 5 });
  client.join("r");
  const ids = Array.from({ length: 5 }, (_, i) => client.post("r", `p${i}`).clientMsgId);
  assert.equal(new Set(ids).size, 5);
  client.close();
});

test("jwt mode: ?token= from getToken on each connect, refresh before expiry, fresh token after 4001", async () => {
  const server = new FakeServer();
  let n = 0;
  const client = makeClient(server, { senderId: null, getToken: async () => `tok${++n}`, refreshMarginMs: 20 });
  const refreshed = collect(client, "refreshed");
  client.join("r");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  const url = server.last.url;
  assert.equal(url.searchParams.get("token"), "tok1");
  assert.equal(url.searchParams.has("sender_id"), false);
  // Expires in 60 ms: the refresh goes out 20 ms before, with a new token.
  server.accept(server.last, { sender_id: "sub-1", expires_at: new Date(Date.now() + 60).toISOString() });
  assert.equal(client.senderId, "sub-1");
  await server.until(() => server.last.sent.some((f) => f.action === "refresh"), "refresh");
  assert.deepEqual(server.last.sent.find((f) => f.action === "refresh"), { action: "refresh", token: "tok2" });
  server.frame(server.last, { type: "refreshed", expires_at: new Date(Date.now() + 10_000).toISOString() });
  assert.equal(refreshed.length, 1);
  server.drop(server.last, 4001);
  await server.until(() => server.sockets.length === 2, "reconnect after 4001");
  assert.equal(server.last.url.searchParams.get("token"), "tok3");
  client.close();
});

test("jwt mode with a fixed token; an unauthorized refresh is retried", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { senderId: null, token: "fixed" });
  client.connect();
  await server.until(() => server.sockets.length === 1);
  assert.equal(server.last.url.searchParams.get("token"), "fixed");
  client.close();

  const s2 = new FakeServer();
  let n = 0;
  const c2 = makeClient(s2, { senderId: null, getToken: () => `t${++n}`, refreshMarginMs: 1000 });
  c2.connect();
  await s2.until(() => s2.sockets.length === 1);
  s2.accept(s2.last, { expires_at: new Date(Date.now() + 30).toISOString() });
  await s2.until(() => s2.last.sent.some((f) => f.action === "refresh"), "refresh");
  s2.frame(s2.last, { type: "error", code: "unauthorized", message: "bad token", action: "refresh" });
  assert.equal(c2.state, "open", "an unauthorized refresh does not drop the connection");
  c2.close();
});

test("members follow joined and presence; a kicked room is not rejoined; history resolves", async () => {
  const server = new FakeServer();
  const client = makeClient(server);
  const members = collect(client, "members");
  client.join("r");
  client.join("k");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept();
  server.frame(server.last, { type: "joined", room_id: "r", last_seq: 0, members: ["alice"] });
  server.frame(server.last, { type: "joined", room_id: "k", last_seq: 0, members: ["alice"] });
  server.frame(server.last, { type: "presence", room_id: "r", event: "join", sender_id: "bob" });
  server.frame(server.last, { type: "presence", room_id: "r", event: "leave", sender_id: "alice2" });
  assert.deepEqual(members.filter((m) => m.roomId === "r").at(-1).members, ["alice", "bob"]);
  const page = client.history("r", { beforeSeq: 10, limit: 5 });
  assert.deepEqual(server.last.sent.at(-1), { action: "history", room_id: "r", limit: 5, before_seq: 10 });
  server.frame(server.last, { type: "history", room_id: "r", messages: [msg("r", 4)], has_more: false });
  assert.equal((await page).messages[0].seq, 4);
  server.frame(server.last, { type: "left", room_id: "k", reason: "kicked" });
  server.drop();
  await server.until(() => server.sockets.length === 2);
  server.accept();
  assert.deepEqual(server.last.sent.map((f) => f.room_id), ["r"]);
  client.close();
});

test("a socket that answers nothing to pings is dropped and replaced", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { pingIntervalMs: 10 });
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept();
  await server.until(() => server.sockets[0].sent.some((f) => f.action === "ping"), "ping");
  await server.until(() => server.sockets.length === 2, "dropped after silence", 3000);
  assert.equal(server.sockets[0].closed.code, 4000);
  client.close();
});

test("posts are paced to the server's rate_per_s, in order, and a rate_limited holds everything", async () => {
  const server = new FakeServer();
  const client = makeClient(server, { random: () => 0 });
  client.join("r");
  client.connect();
  await server.until(() => server.sockets.length === 1);
  server.accept(server.last, { limits: { max_content: 4096, max_rooms: 100, rate_per_s: 50 } });
  server.frame(server.last, { type: "joined", room_id: "r", last_seq: 0, members: [] });
  const posts = Array.from({ length: 60 }, (_, i) => client.post("r", `p${i}`));
  const sock = server.last;
  const sentPosts = () => sock.sent.filter((f) => f.action === "message");
  assert.equal(sentPosts().length, 50, "a burst of the rate, then paced");
  await server.until(() => sentPosts().length === 60, "the rest, paced", 3000);
  assert.deepEqual(sentPosts().map((f) => f.content), posts.map((p) => p.content));
  // rate_limited on one post: nothing at all is sent until the hold is over.
  const late = client.post("r", "late");
  const before = sentPosts().length;
  server.frame(sock, { type: "error", code: "rate_limited", message: "slow down", action: "message",
                       room_id: "r", client_msg_id: posts[0].clientMsgId });
  assert.ok(client._holdUntil > Date.now());
  await server.until(() => sentPosts().some((f) => f.client_msg_id === posts[0].clientMsgId && f !== sentPosts()[0]), "retry after hold", 3000);
  assert.ok(sentPosts().length > before);
  assert.equal(late.state, "pending");
  client.close();
});
