// quartchat web client: the page at / for browsers, built on quartchat.js.
// Owns the DOM only; every protocol rule lives in the module. Text from the
// network is rendered with textContent, never as HTML.
import { QuartchatClient, explainRoomId, explainSenderId } from "./quartchat.js";

const $ = (id) => document.getElementById(id);
const KEY = { name: "quartchat.name", rooms: "quartchat.rooms", current: "quartchat.current" };
const params = new URLSearchParams(location.search);
const token = params.get("token");

const store = {
  get(k) { try { return sessionStorage.getItem(k) ?? localStorage.getItem(k); } catch { return null; } },
  set(k, v) { try { sessionStorage.setItem(k, v); localStorage.setItem(k, v); } catch { /* private mode */ } },
};

let client = null;
let current = null;             // the room shown
const views = new Map();        // room_id -> {list, pending, seqs:Set, unread, oldest, hasMore, members}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function showProblem(text) {
  const p = $("problem");
  p.textContent = text ?? "";
  p.hidden = !text;
}

function randomGuest() {
  const b = crypto.getRandomValues(new Uint8Array(3));
  return "guest-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function savedRooms() {
  try { return JSON.parse(store.get(KEY.rooms) ?? "[]").filter((r) => !explainRoomId(r)); } catch { return []; }
}

function saveRooms() {
  store.set(KEY.rooms, JSON.stringify([...views.keys()]));
  if (current) store.set(KEY.current, current);
}

// ---- views ------------------------------------------------------------

function view(roomId) {
  let v = views.get(roomId);
  if (!v) {
    const list = el("ol", "messages");
    list.dataset.room = roomId;
    list.setAttribute("role", "log");
    list.setAttribute("aria-live", "polite");
    list.setAttribute("aria-label", `Messages in ${roomId}`);
    list.hidden = true;
    const pending = el("ol", "messages pending-list");
    pending.hidden = true;
    $("rooms-view").append(list, pending);
    v = { roomId, list, pending, seqs: new Set(), unread: 0, oldest: null, hasMore: true,
          members: [], postEls: new Map(), resumed: false };
    views.set(roomId, v);
  }
  return v;
}

function formatTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const sameDay = d.toDateString() === new Date().toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return sameDay ? time : `${d.toLocaleDateString()} ${time}`;
}

function messageEl(m, own) {
  const li = el("li", `msg ${own ? "own" : "other"}`);
  li.dataset.seq = String(m.seq);
  if (m.client_msg_id) li.dataset.cmid = m.client_msg_id;
  const meta = el("div", "meta");
  meta.append(el("span", "sender", own ? `${m.sender_id} (you)` : m.sender_id));
  const t = el("time", null, formatTime(m.sent_at));
  t.dateTime = m.sent_at;
  t.title = m.sent_at;
  meta.append(t);
  if (own) meta.append(el("span", "state", "✓ sent"));
  li.append(meta, el("div", "body", m.content));
  return li;
}

function nearBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
}

function scrollToBottom() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
  $("jump").hidden = true;
}

function systemLine(roomId, text, cls = "") {
  const v = view(roomId);
  const stick = roomId === current && nearBottom();
  v.list.append(el("li", `sys ${cls}`.trim(), text));
  if (stick) scrollToBottom();
}

function addMessage(m, { replay }) {
  const v = view(m.room_id);
  if (v.seqs.has(m.seq)) return;  // the module never repeats a seq; a loaded page might
  v.seqs.add(m.seq);
  const own = client && m.sender_id === client.senderId;
  const stick = m.room_id === current && nearBottom();
  // In seq order: nearly always at the end.
  let before = null;
  for (let n = v.list.lastElementChild; n; n = n.previousElementSibling) {
    if (!n.dataset.seq) continue;
    if (Number(n.dataset.seq) < m.seq) break;
    before = n;
  }
  const li = messageEl(m, own);
  v.list.insertBefore(li, before);
  if (v.oldest == null || m.seq < v.oldest) v.oldest = m.seq;
  if (m.client_msg_id && v.postEls.has(m.client_msg_id)) {
    v.postEls.get(m.client_msg_id).remove();
    v.postEls.delete(m.client_msg_id);
    v.pending.hidden = v.postEls.size === 0 || m.room_id !== current;
  }
  const firstJoinReplay = replay && !v.resumed;
  if (!own && !firstJoinReplay && (m.room_id !== current || document.hidden || !stick)) {
    v.unread += 1;
    renderRooms();
  }
  if (m.room_id === current) {
    if (stick || own) scrollToBottom();
    else $("jump").hidden = false;
  }
}

function renderPost(post) {
  const v = view(post.roomId);
  let li = v.postEls.get(post.clientMsgId);
  if (post.state === "sent" && !li) return;
  const created = !li;
  if (!li) {
    li = el("li", "msg own pending");
    li.dataset.cmid = post.clientMsgId;
    const meta = el("div", "meta");
    meta.append(el("span", "sender", `${client.senderId} (you)`), el("span", "state"));
    li.append(meta, el("div", "body", post.content));
    v.pending.append(li);
    v.postEls.set(post.clientMsgId, li);
  }
  li.className = `msg own ${post.state}`;
  li.dataset.state = post.state;
  const state = li.querySelector(".state");
  li.querySelector(".retry")?.remove();
  if (post.state === "pending") state.textContent = "sending…";
  else if (post.state === "sent") state.textContent = "✓ sent";
  else {
    state.textContent = `not sent: ${post.error?.message ?? post.error?.code ?? "failed"}`;
    const retry = el("button", "retry", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => client.retry(post));
    li.querySelector(".meta").append(retry);
  }
  v.pending.hidden = post.roomId !== current;
  if (created && post.roomId === current) scrollToBottom();  // a state change never moves the view
}

function renderRooms() {
  const ul = $("my-rooms");
  ul.replaceChildren();
  let total = 0;
  for (const v of views.values()) {
    total += v.unread;
    const b = el("button", null);
    b.type = "button";
    b.append(el("span", "room-name", v.roomId));
    if (v.unread) {
      const badge = el("span", "badge", String(v.unread));
      badge.setAttribute("aria-label", `${v.unread} unread`);
      b.append(badge);
    }
    b.setAttribute("aria-current", String(v.roomId === current));
    b.addEventListener("click", () => select(v.roomId));
    const li = el("li");
    li.append(b);
    ul.append(li);
  }
  document.title = total ? `(${total}) quartchat` : "quartchat";
}

function renderMembers() {
  const v = current ? views.get(current) : null;
  const members = v ? v.members : [];
  $("members-toggle").textContent = `Members (${members.length})`;
  const ul = $("members");
  ul.replaceChildren(...[...members].sort().map((m) => el("li", null, m === client?.senderId ? `${m} (you)` : m)));
}

function updateHead() {
  const v = current ? views.get(current) : null;
  $("room-title").textContent = current ? `# ${current}` : "No room yet";
  $("empty").hidden = !!current;
  $("older").hidden = !v || !v.hasMore || v.oldest == null || v.oldest <= 1;
  $("leave").disabled = !current;
  $("text").disabled = $("send").disabled = !current;
}

function select(roomId) {
  current = roomId;
  for (const v of views.values()) {
    v.list.hidden = v.roomId !== roomId;
    v.pending.hidden = v.roomId !== roomId || v.postEls.size === 0;
  }
  const v = roomId ? views.get(roomId) : null;
  if (v) v.unread = 0;
  updateHead();
  saveRooms();
  renderRooms();
  renderMembers();
  scrollToBottom();
}

// ---- connecting -----------------------------------------------------------

function describeState(s) {
  switch (s.state) {
    case "connecting": return s.attempt ? `Reconnecting (attempt ${s.attempt + 1})…` : "Connecting…";
    case "open": return `Connected as ${client.senderId}`;
    case "waiting": return `Connection lost${s.code ? ` (${s.code})` : ""}: retrying in ${Math.ceil(s.delayMs / 1000)} s`;
    case "closed": return s.code === 4003 ? "Disconnected by the server (not reconnecting)" : "Not connected";
    default: return "Not connected";
  }
}

function start(name) {
  if (client) client.close();
  const rooms = [...views.keys()];
  client = new QuartchatClient(token ? { token } : { senderId: name });
  window.quartchatApp.client = client;
  client.on("state", (s) => {
    $("status").textContent = describeState(s);
    $("status").dataset.state = s.state;
    if (s.state === "open") showProblem(null);
  });
  client.on("error", (e) => {
    if (e.code === "handshake_refused") showProblem(e.message);
    else if (e.action === "join" && e.room_id && !client.rooms.has(e.room_id)) {
      // A refused join (forbidden, too many rooms, ...): the client dropped the room; so does the view.
      showProblem(`Could not join ${e.room_id}: ${e.code}: ${e.message}`);
      removeRoom(e.room_id);
    } else if (!e.client_msg_id && e.code !== "rate_limited") showProblem(`${e.code}: ${e.message}`);
  });
  client.on("joined", (j) => {
    const v = view(j.roomId);
    v.resumed = j.resumed;  // a first join's history replay is not "unread"
    if (!j.resumed && j.lastSeq === 0) v.hasMore = false;
    v.members = j.members;
    if (j.roomId === current) updateHead();
  });
  client.on("recovered", (r) => {
    systemLine(r.roomId, r.count
      ? `Reconnected: ${r.count} missed message${r.count === 1 ? "" : "s"} recovered`
      : "Reconnected: nothing missed", "recovered");
  });
  client.on("message", ({ message, replay }) => {
    addMessage(message, { replay });
    if (message.room_id === current) updateHead();
  });
  client.on("members", (m) => { view(m.roomId).members = m.members; if (m.roomId === current) renderMembers(); });
  client.on("presence", (p) => systemLine(p.room_id, `${p.sender_id} ${p.event === "join" ? "joined" : "left"}`));
  client.on("post", ({ post }) => renderPost(post));
  client.on("left", (f) => {
    if (f.reason) { showProblem(`You left ${f.room_id} (${f.reason}).`); removeRoom(f.room_id); }
  });
  for (const r of rooms) client.join(r);
  client.connect();
}

function removeRoom(roomId) {
  const v = views.get(roomId);
  if (!v) return;
  v.list.remove(); v.pending.remove();
  views.delete(roomId);
  select(views.size ? [...views.keys()][0] : null);
}

function joinRoom(roomId) {
  const why = explainRoomId(roomId);
  if (why) { showProblem(why); return false; }
  view(roomId);
  if (client && !client.rooms.has(roomId)) client.join(roomId);
  select(roomId);
  return true;
}

async function loadOlder() {
  const v = current && views.get(current);
  if (!v || v.oldest == null) return;
  const log = $("log");
  $("older").disabled = true;
  try {
    const page = await client.history(v.roomId, { beforeSeq: v.oldest, limit: 50 });
    const fromBottom = log.scrollHeight - log.scrollTop;
    const first = v.list.firstChild;
    for (const m of page.messages) {
      if (v.seqs.has(m.seq)) continue;
      v.seqs.add(m.seq);
      v.list.insertBefore(messageEl(m, m.sender_id === client.senderId), first);
      if (m.seq < v.oldest) v.oldest = m.seq;
    }
    v.hasMore = page.has_more;
    log.scrollTop = log.scrollHeight - fromBottom;  // keep reading where you were
  } catch (e) {
    showProblem(`Could not load older messages: ${e.message}`);
  } finally {
    $("older").disabled = false;
    $("older").hidden = !v.hasMore;
  }
}

async function refreshRoomList() {
  const ul = $("all-rooms");
  try {
    const r = await fetch("/api/rooms", { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const body = await r.json();
    ul.replaceChildren(...body.rooms.map(({ room_id, members }) => {
      const b = el("button", null, `${room_id} (${members})`);
      b.type = "button";
      b.addEventListener("click", () => joinRoom(room_id));
      const li = el("li");
      li.append(b);
      return li;
    }));
    if (!body.rooms.length) ul.replaceChildren(el("li", "empty", "No active rooms"));
  } catch (e) {
    ul.replaceChildren(el("li", "empty", `Room list unavailable (${e.message})`));
  }
}

// ---- wiring ----------------------------------------------------------------

function send() {
  const text = $("text");
  const content = text.value;
  if (!current || !content.trim() || !client) return;
  try {
    client.post(current, content);
    text.value = "";
  } catch (e) {
    showProblem(e.message);
  }
}

function init() {
  window.quartchatApp = { client: null, views, joinRoom, select };
  const name = params.get("sender_id") ?? store.get(KEY.name) ?? randomGuest();
  $("name").value = token ? "(from token)" : name;
  if (token) { $("name").disabled = true; $("connect").hidden = true; }
  for (const r of savedRooms()) view(r);
  const wanted = params.get("room");
  if (wanted && !explainRoomId(wanted)) view(wanted);
  else if (wanted) showProblem(explainRoomId(wanted));
  const last = store.get(KEY.current);
  select(wanted && views.has(wanted) ? wanted : views.has(last) ? last : (views.keys().next().value ?? null));

  $("who").addEventListener("submit", (e) => {
    e.preventDefault();
    const n = $("name").value.trim();
    const why = explainSenderId(n);
    if (why) { showProblem(why); $("name").focus(); return; }
    store.set(KEY.name, n);
    showProblem(null);
    start(n);
  });
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (joinRoom($("join-room").value.trim())) $("join-room").value = "";
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("leave").addEventListener("click", () => {
    if (!current) return;
    client?.leave(current);
    removeRoom(current);
  });
  $("members-toggle").addEventListener("click", () => {
    const stick = nearBottom();
    const open = $("members").hidden;
    $("members").hidden = !open;
    $("members-toggle").setAttribute("aria-expanded", String(open));
    if (stick) scrollToBottom();
  });
  $("older").addEventListener("click", loadOlder);
  $("jump").addEventListener("click", scrollToBottom);
  $("log").addEventListener("scroll", () => {
    if (nearBottom()) {
      $("jump").hidden = true;
      const v = current && views.get(current);
      if (v && v.unread) { v.unread = 0; renderRooms(); }
    }
  });
  document.addEventListener("visibilitychange", () => {
    const v = current && views.get(current);
    if (!document.hidden && v && v.unread && nearBottom()) { v.unread = 0; renderRooms(); }
  });
  document.addEventListener("keydown", (e) => {
    if (!e.altKey || (e.key !== "ArrowUp" && e.key !== "ArrowDown")) return;
    const keys = [...views.keys()];
    if (!keys.length) return;
    const i = keys.indexOf(current);
    select(keys[(i + (e.key === "ArrowDown" ? 1 : keys.length - 1)) % keys.length]);
    e.preventDefault();
  });
  $("browse").addEventListener("toggle", () => { if ($("browse").open) refreshRoomList(); });
  $("refresh-rooms").addEventListener("click", refreshRoomList);

  const why = token ? null : explainSenderId(name);
  if (why) { showProblem(why); return; }
  store.set(KEY.name, name);
  start(name);
}

init();
