/**
 * quartchat.js: the "reliable client recipe" of quartchat's wire protocol
 * (version 1) as a plain ES module with no dependencies and no build step.
 * It runs in browsers and in Node (pass a `WebSocket` constructor there).
 *
 * What it owns: one WebSocket at a time, reconnected with backoff and jitter
 * after any close except 4003; the last seq seen per room, so every rejoin
 * asks for `since_seq` (no gap, no duplicate); one random `client_msg_id`
 * per post (never a clock), resent unchanged until acked, with a
 * pending / sent / failed state; `rate_limited` and `unavailable` answered by
 * waiting and retrying; auth mode "jwt" (`?token=`, `refresh` before
 * expiry, a fresh token after 4001). The page listens to events:
 *
 *   state     {state, attempt, delayMs, code, reason}   idle|connecting|open|waiting|closed
 *   welcome   the welcome frame
 *   joined    {roomId, lastSeq, members, resumed}
 *   members   {roomId, members}                          after joined and presence
 *   message   {message, replay}                          each seq once, in order
 *   recovered {roomId, count, sinceSeq}                   a rejoin's replay is complete
 *   post      {post, state}                              a post changed state
 *   presence, left, history, pong, refreshed             the frames as they came
 *   error     an error frame, or {code: "handshake_refused" | "token", message}
 */

export const PROTOCOL = 1;
export const SENDER_ID_RE = /^[A-Za-z0-9_.@:-]{1,64}$/;
export const ROOM_ID_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
/** Closed by the application: do not reconnect. */
export const CLOSE_NO_RECONNECT = 4003;
/** Token expired without a refresh: reconnect with a fresh token. */
export const CLOSE_TOKEN_EXPIRED = 4001;
const RETRYABLE = new Set(["rate_limited", "unavailable"]);

const nameOf = (c) => (c === " " ? "space" : c.trim() === "" ? `U+${c.codePointAt(0).toString(16).toUpperCase()}` : c);

/** Why `id` is not a valid sender id (null when it is): the server's rule, in words. */
export function explainSenderId(id) {
  if (typeof id !== "string" || id.length === 0) return "A name is required.";
  if (id.length > 64) return `A name has at most 64 characters (this one has ${id.length}).`;
  if (!SENDER_ID_RE.test(id)) {
    const bad = [...new Set(id.replace(/[A-Za-z0-9_.@:-]/g, ""))].map(nameOf).join(" ");
    return `A name may use only letters A-Z a-z, digits and _ . @ : - (not: ${bad}).`;
  }
  return null;
}

/** Why `id` is not a valid room id (null when it is). */
export function explainRoomId(id) {
  if (typeof id !== "string" || id.length === 0) return "A room name is required.";
  if (id.length > 64) return `A room name has at most 64 characters (this one has ${id.length}).`;
  if (!ROOM_ID_RE.test(id)) {
    const bad = [...new Set(id.replace(/[A-Za-z0-9_.:-]/g, ""))].map(nameOf).join(" ");
    return `A room name may use only letters, digits and _ . : - (not: ${bad}).`;
  }
  return null;
}

/** A random RFC 4122 version 4 id: crypto.randomUUID, else crypto.getRandomValues. Never a clock. */
export function newClientMsgId(c = globalThis.crypto) {
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  if (!c || typeof c.getRandomValues !== "function") {
    throw new Error("crypto.getRandomValues is missing: cannot make a client_msg_id");
  }
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Exponential backoff with "equal jitter": somewhere in [cap/2, cap], cap = min(max, initial * 2^attempt). */
export function backoffDelay(attempt, { initialMs = 500, maxMs = 15000 } = {}, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.round(cap / 2 + (random() * cap) / 2);
}

/** The chat URL of the page's own server: ws(s)://host/chat. */
export function defaultUrl(loc = globalThis.location) {
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/chat`;
}

export class QuartchatClient {
  /**
   * @param {object} o
   * @param {string} [o.url]  ws://host/chat (default: this page's server)
   * @param {string} [o.senderId]  auth mode "none"
   * @param {string} [o.token]  auth mode "jwt": sent as ?token=
   * @param {() => Promise<string>|string} [o.getToken]  called before every connect and refresh
   * @param {number} [o.history]  messages replayed on a room's first join (0..100)
   */
  constructor(o = {}) {
    this.url = o.url ?? defaultUrl();
    this.senderId = o.senderId ?? null;
    this.token = o.token ?? null;
    this.getToken = o.getToken ?? null;
    this.historySize = o.history ?? 50;
    this.backoff = { initialMs: 500, maxMs: 15000, ...(o.backoff ?? {}) };
    // How long a post told rate_limited / unavailable waits before its retry.
    this.retryBackoff = { initialMs: 500, maxMs: 10000, ...(o.retryBackoff ?? {}) };
    this.ackTimeoutMs = o.ackTimeoutMs ?? 8000;   // resend an unacked post after this
    this.tickMs = o.tickMs ?? 250;                // how often retries are looked at
    this.pingIntervalMs = o.pingIntervalMs ?? 25000;  // 0: no application pings
    this.refreshMarginMs = o.refreshMarginMs ?? 30000;
    this._WS = o.WebSocket ?? globalThis.WebSocket;
    this._crypto = o.crypto ?? globalThis.crypto;
    this._random = o.random ?? Math.random;
    this._now = o.now ?? (() => Date.now());
    this.state = "idle";
    this.attempt = 0;          // failed connects since the last welcome
    this.welcome = null;
    this.rooms = new Map();    // room_id -> {lastSeq, baseline, joined, members, ...}
    this.posts = new Map();    // client_msg_id -> post, until acked or failed
    this._listeners = new Map();
    this._ws = null;
    this._timers = new Set();
    this._historyWaiters = new Map();
    this._stopped = false;
  }

  // ---- events ----------------------------------------------------------

  /** Listen to an event; returns a function that stops listening. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type)?.delete(fn);
  }

  _emit(type, detail) {
    for (const fn of this._listeners.get(type) ?? []) {
      try { fn(detail); } catch (e) { console.error(`quartchat: ${type} listener failed`, e); }
    }
  }

  // ---- public API --------------------------------------------------------

  /** Start connecting (and keep reconnecting until close()). */
  connect() {
    if (!this.token && !this.getToken) {
      const why = explainSenderId(this.senderId);
      if (why) throw new Error(why);
    }
    this._stopped = false;
    if (this.state === "idle" || this.state === "closed") this._open();
    return this;
  }

  /** Close for good: no reconnect. Pending posts stay pending (connect() again resends them). */
  close() {
    this._stopped = true;
    this._clearTimers();
    const ws = this._ws;
    this._detach();
    if (ws) { try { ws.close(1000, "client closed"); } catch { /* already closed */ } }
    this._lost();
    this._setState("closed", { code: 1000 });
  }

  /** Join a room now or on the next connect; rejoins use since_seq. */
  join(roomId, { history = this.historySize } = {}) {
    const why = explainRoomId(roomId);
    if (why) throw new Error(why);
    let room = this.rooms.get(roomId);
    if (!room) {
      room = { roomId, lastSeq: null, baseline: null, joined: false, members: new Set(),
               history, replayUntil: null, recovering: null, joinRetryAt: null };
      this.rooms.set(roomId, room);
    }
    if (this.state === "open" && !room.joined) this._sendJoin(room);
    return room;
  }

  /** Leave a room; its pending posts fail. */
  leave(roomId) {
    const room = this.rooms.get(roomId);
    if (!room) return;
    this.rooms.delete(roomId);
    if (room.joined) this._send({ action: "leave", room_id: roomId });
    for (const post of this.posts.values()) {
      if (post.roomId === roomId) this._fail(post, "left", "you left the room");
    }
  }

  /** The last seq seen in a room (null: none yet). */
  lastSeq(roomId) {
    const room = this.rooms.get(roomId);
    return room ? (room.lastSeq ?? room.baseline) : null;
  }

  /** Post to a room: returns the post {clientMsgId, roomId, content, state, seq, id, error}. */
  post(roomId, content) {
    if (!this.rooms.has(roomId)) throw new Error(`join ${roomId} before posting to it`);
    if (typeof content !== "string" || content.length === 0) throw new Error("a message cannot be empty");
    const post = { clientMsgId: newClientMsgId(this._crypto), roomId, content, state: "pending",
                   seq: null, id: null, error: null, attempts: 0, sentAt: null, retryAt: null };
    this.posts.set(post.clientMsgId, post);
    this._emit("post", { post, state: post.state });
    if (this.state === "open") this._tick();
    return post;
  }

  /** Send a failed post again, with the same client_msg_id. */
  retry(post) {
    if (post.state !== "failed" || !this.rooms.has(post.roomId)) return false;
    post.state = "pending"; post.error = null; post.attempts = 0; post.sentAt = null; post.retryAt = null;
    this.posts.set(post.clientMsgId, post);
    this._emit("post", { post, state: post.state });
    if (this.state === "open") this._tick();
    return true;
  }

  /** Page back through a room: resolves with the history frame {messages, has_more}. */
  history(roomId, { beforeSeq = null, limit = 50 } = {}) {
    return new Promise((resolve, reject) => {
      const frame = { action: "history", room_id: roomId, limit };
      if (beforeSeq != null) frame.before_seq = beforeSeq;
      if (!this._send(frame)) { reject(new Error("not connected")); return; }
      if (!this._historyWaiters.has(roomId)) this._historyWaiters.set(roomId, []);
      this._historyWaiters.get(roomId).push({ resolve, reject });
    });
  }

  /** Replace the token used for the next connect (jwt mode). */
  setToken(token) { this.token = token; }

  // ---- connection ----------------------------------------------------------

  async _open() {
    this._setState("connecting", { attempt: this.attempt });
    let params;
    if (this.getToken || this.token) {
      if (this.getToken) {
        try {
          this.token = await this.getToken();
        } catch (e) {
          this._emit("error", { code: "token", message: `could not get a token: ${e?.message ?? e}` });
          this._scheduleReconnect(null, "no token");
          return;
        }
        if (this._stopped) return;
      }
      params = { token: this.token };
    } else {
      params = { sender_id: this.senderId };
    }
    const u = new URL(this.url);
    for (const [k, v] of Object.entries(params)) u.searchParams.set(k, v);
    let ws;
    try {
      ws = new this._WS(u.toString());
    } catch (e) {
      this._emit("error", { code: "handshake_refused", message: String(e?.message ?? e) });
      this._scheduleReconnect(null, "bad url");
      return;
    }
    this._ws = ws;
    this.welcome = null;
    ws.onmessage = (e) => { if (this._ws === ws) this._onFrame(e.data); };
    ws.onclose = (e) => { if (this._ws === ws) this._onClose(e.code, e.reason); };
    ws.onerror = () => {};  // a close event follows
  }

  _detach() {
    const ws = this._ws;
    if (ws) { ws.onmessage = ws.onclose = ws.onerror = null; }
    this._ws = null;
  }

  /** The socket is gone (closed, dropped, or given up on). */
  _onClose(code, reason) {
    const welcomed = this.welcome !== null;
    this._detach();
    this._clearTimers();
    this._lost();
    if (this._stopped) { this._setState("closed", { code, reason }); return; }
    if (code === CLOSE_NO_RECONNECT) {
      this._stopped = true;
      this._setState("closed", { code, reason: reason || "disconnected by the server" });
      return;
    }
    if (!welcomed) {
      this._emit("error", {
        code: "handshake_refused",
        message: "Could not connect: the server is unreachable, or it refused the handshake " +
          "(a bad sender id, a missing or expired token, an origin not allowed, or a server shutting down).",
      });
    } else if (code === CLOSE_TOKEN_EXPIRED && !this.getToken) {
      this._emit("error", { code: "token", message: "the token expired; call setToken() with a fresh one" });
    }
    this._scheduleReconnect(code, reason);
  }

  _lost() {
    this.welcome = null;
    for (const room of this.rooms.values()) { room.joined = false; room.recovering = null; }
    for (const post of this.posts.values()) post.sentAt = null;
    for (const waiters of this._historyWaiters.values()) {
      for (const w of waiters) w.reject(new Error("disconnected"));
    }
    this._historyWaiters.clear();
  }

  _scheduleReconnect(code, reason) {
    const delayMs = backoffDelay(this.attempt, this.backoff, this._random);
    this.attempt += 1;
    this._setState("waiting", { attempt: this.attempt, delayMs, code, reason });
    this._after(delayMs, () => { if (!this._stopped) this._open(); });
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || this.welcome === null || ws.readyState !== 1) return false;
    try { ws.send(JSON.stringify(frame)); return true; } catch { return false; }
  }

  _drop(reason) {
    // The socket looks dead (no answer to a ping): give up on it at once rather
    // than wait for a close handshake that may never come.
    const ws = this._ws;
    this._detach();
    if (ws) { try { ws.close(4000, reason); } catch { /* ignore */ } }
    this._onClose(4000, reason);
  }

  _after(ms, fn) {
    const t = setTimeout(() => { this._timers.delete(t); fn(); }, ms);
    this._timers.add(t);
    return t;
  }

  _every(ms, fn) {
    const t = setInterval(fn, ms);
    this._timers.add(t);
    return t;
  }

  _clearTimers() {
    for (const t of this._timers) { clearTimeout(t); clearInterval(t); }
    this._timers.clear();
  }

  // ---- frames ----------------------------------------------------------------

  _onFrame(data) {
    let f;
    try { f = JSON.parse(data); } catch { return; }
    this._lastFrameAt = this._now();
    switch (f.type) {
      case "welcome": return this._onWelcome(f);
      case "joined": return this._onJoined(f);
      case "message": return this._onMessage(f);
      case "ack": return this._onAck(f);
      case "presence": return this._onPresence(f);
      case "left": return this._onLeft(f);
      case "history": return this._onHistory(f);
      case "refreshed": this._scheduleRefresh(f.expires_at); return this._emit("refreshed", f);
      case "error": return this._onError(f);
      case "pong": return this._emit("pong", f);
      default: return undefined;
    }
  }

  _onWelcome(f) {
    this.welcome = f;
    this.senderId = f.sender_id;
    this._rate = f.limits?.rate_per_s ?? 0;
    this._tokens = Math.max(1, this._rate);
    this._tokensAt = this._now();
    this._holdUntil = 0;
    this.attempt = 0;
    this._setState("open", { attempt: 0 });
    this._emit("welcome", f);
    for (const room of this.rooms.values()) this._sendJoin(room);
    this._every(this.tickMs, () => this._tick());
    if (this.pingIntervalMs > 0) {
      this._lastFrameAt = this._now();
      this._every(this.pingIntervalMs, () => {
        if (this._now() - this._lastFrameAt > 2 * this.pingIntervalMs) this._drop("no answer to ping");
        else this._send({ action: "ping" });
      });
    }
    if (f.expires_at) this._scheduleRefresh(f.expires_at);
  }

  _sendJoin(room) {
    const since = room.lastSeq ?? room.baseline;
    const frame = { action: "join", room_id: room.roomId };
    if (since != null) frame.since_seq = since;
    else frame.history = room.history;
    room.sinceSent = since;
    room.joinRetryAt = null;
    this._send(frame);
  }

  _onJoined(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return;
    room.joined = true;
    room.members = new Set(f.members);
    room.replayUntil = f.last_seq;
    const resumed = room.sinceSent != null;
    if (room.lastSeq == null && room.baseline == null) {
      // Nothing seen yet: the history replay covers up to last_seq, so a rejoin
      // asks for what came after it (no duplicates of an empty history either).
      room.baseline = room.history > 0 ? Math.max(0, f.last_seq - room.history) : f.last_seq;
    }
    this._emit("joined", { roomId: room.roomId, lastSeq: f.last_seq, members: [...room.members], resumed });
    this._emit("members", { roomId: room.roomId, members: [...room.members] });
    if (resumed) {
      const sinceSeq = room.sinceSent;
      if (f.last_seq <= sinceSeq || (room.lastSeq ?? 0) >= f.last_seq) {
        this._emit("recovered", { roomId: room.roomId, count: 0, sinceSeq });
      } else {
        room.recovering = { sinceSeq, count: 0, until: f.last_seq };
      }
    }
    for (const post of this.posts.values()) {
      if (post.roomId === room.roomId) post.sentAt = null;  // due at once (an earlier send may be lost)
    }
    this._tick();
  }

  _onMessage(f) {
    const room = this.rooms.get(f.room_id);
    if (!room) return;
    const last = room.lastSeq;
    if (last != null && f.seq <= last) return;  // already shown: never twice
    room.lastSeq = f.seq;
    const replay = room.replayUntil != null && f.seq <= room.replayUntil;
    if (f.client_msg_id != null && f.sender_id === this.senderId) {
      const post = this.posts.get(f.client_msg_id);
      if (post) this._sent(post, f.seq, f.id);
    }
    this._emit("message", { message: f, replay });
    const rec = room.recovering;
    if (rec) {
      rec.count += 1;
      if (f.seq >= rec.until) {
        room.recovering = null;
        this._emit("recovered", { roomId: room.roomId, count: rec.count, sinceSeq: rec.sinceSeq });
      }
    }
  }

  _onAck(f) {
    const post = f.client_msg_id != null ? this.posts.get(f.client_msg_id) : null;
    if (post) this._sent(post, f.seq, f.id);
  }

  _sent(post, seq, id) {
    this.posts.delete(post.clientMsgId);
    if (post.state === "sent") return;
    post.state = "sent"; post.seq = seq; post.id = id; post.error = null;
    this._emit("post", { post, state: post.state });
  }

  _fail(post, code, message) {
    this.posts.delete(post.clientMsgId);
    post.state = "failed"; post.error = { code, message };
    this._emit("post", { post, state: post.state });
  }

  /** A token of the client-side bucket mirroring the server's rate_per_s (0: no limit). */
  _take(now) {
    if (now < this._holdUntil) return false;
    if (!(this._rate > 0)) return true;
    const cap = Math.max(1, this._rate);
    this._tokens = Math.min(cap, this._tokens + ((now - this._tokensAt) / 1000) * this._rate);
    this._tokensAt = now;
    if (this._tokens < 1) return false;
    this._tokens -= 1;
    return true;
  }

  _sendPost(post) {
    const frame = { action: "message", room_id: post.roomId, content: post.content,
                    client_msg_id: post.clientMsgId };
    if (this._send(frame)) {
      post.attempts += 1;
      post.sentAt = this._now();
      post.retryAt = null;
    }
  }

  _onPresence(f) {
    const room = this.rooms.get(f.room_id);
    if (room) {
      if (f.event === "join") room.members.add(f.sender_id);
      else room.members.delete(f.sender_id);
      this._emit("members", { roomId: room.roomId, members: [...room.members] });
    }
    this._emit("presence", f);
  }

  _onLeft(f) {
    const room = this.rooms.get(f.room_id);
    if (room && f.reason) {
      // kicked, or no longer allowed by the token: not rejoined.
      this.rooms.delete(f.room_id);
      for (const post of this.posts.values()) {
        if (post.roomId === f.room_id) this._fail(post, f.reason, `left the room (${f.reason})`);
      }
    }
    this._emit("left", f);
  }

  _onHistory(f) {
    const w = this._historyWaiters.get(f.room_id)?.shift();
    if (w) w.resolve(f);
    this._emit("history", f);
  }

  _onError(f) {
    const now = this._now();
    const post = f.client_msg_id != null ? this.posts.get(f.client_msg_id) : null;
    if (post) {
      if (RETRYABLE.has(f.code)) {
        post.sentAt = null;
        post.retryAt = now + backoffDelay(post.attempts, this.retryBackoff, this._random);
        if (f.code === "rate_limited") {  // the limit is per connection: everything waits
          this._holdUntil = Math.max(this._holdUntil ?? 0, post.retryAt);
          this._tokens = 0;
        }
      } else if (f.code === "not_joined" && this.rooms.has(post.roomId)) {
        post.sentAt = null;  // resent after the rejoin's `joined`
        const room = this.rooms.get(post.roomId);
        room.joined = false;
        this._sendJoin(room);
      } else {
        this._fail(post, f.code, f.message);
      }
    } else if (f.action === "join" && this.rooms.has(f.room_id)) {
      const room = this.rooms.get(f.room_id);
      if (RETRYABLE.has(f.code)) {
        room.joinRetryAt = now + backoffDelay(1, this.backoff, this._random);
      } else {
        this.rooms.delete(f.room_id);
        for (const p of this.posts.values()) if (p.roomId === f.room_id) this._fail(p, f.code, f.message);
      }
    } else if (f.action === "history" && f.room_id != null) {
      this._historyWaiters.get(f.room_id)?.shift()?.reject(new Error(`${f.code}: ${f.message}`));
    } else if (f.action === "refresh") {
      this._scheduleRefresh(null, 5000);
    }
    this._emit("error", f);
  }

  /** Resend what is due: posts unacked for too long or told to wait, rooms whose join must be retried. */
  _tick() {
    if (this.welcome === null) return;
    const now = this._now();
    for (const room of this.rooms.values()) {
      if (!room.joined && room.joinRetryAt != null && now >= room.joinRetryAt) this._sendJoin(room);
    }
    for (const post of this.posts.values()) {
      if (post.state !== "pending" || !this.rooms.get(post.roomId)?.joined) continue;
      const due = post.retryAt != null ? now >= post.retryAt
        : post.sentAt != null ? now - post.sentAt >= this.ackTimeoutMs : true;
      if (!due) continue;
      if (!this._take(now)) break;  // paced: nothing overtakes a post that must wait
      this._sendPost(post);
    }
  }

  // ---- jwt ---------------------------------------------------------------

  _scheduleRefresh(expiresAt, delayMs = null) {
    if (!this.getToken) return;
    if (this._refreshTimer) { clearTimeout(this._refreshTimer); this._timers.delete(this._refreshTimer); }
    if (delayMs == null) {
      const left = Date.parse(expiresAt) - this._now();
      delayMs = Math.max(0, left > 2 * this.refreshMarginMs ? left - this.refreshMarginMs : left / 2);
    }
    this._refreshTimer = this._after(delayMs, async () => {
      let token;
      try {
        token = await this.getToken();
      } catch (e) {
        this._emit("error", { code: "token", message: `could not get a token: ${e?.message ?? e}` });
        this._scheduleRefresh(null, 5000);
        return;
      }
      this.token = token;
      this._send({ action: "refresh", token });
    });
  }
}
