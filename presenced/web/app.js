// Virtual HQ: a room where everyone's cursor moves live, with who is online, the latency to
// your daemon, room chat and direct messages. Query parameters: ?user=NAME&room=ROOM&ws=URL.
// By default it connects to the daemon that served the page (/client.json).

import { connect } from "./presenced.js";

const params = new URLSearchParams(location.search);
const room = params.get("room") || "hq";
const user = params.get("user") || rememberedName();
const color = colorOf(user);
const $ = (id) => document.getElementById(id);

const floor = $("floor");
const cursors = new Map(); // session -> element
const chatTargets = new Set();
const unread = [];
let client = null;

main().catch((error) => {
  setStatus("closed", String(error.message || error));
  console.error(error);
});

async function main() {
  $("room-name").textContent = `#${room}`;
  $("me").textContent = user;
  $("me").style.setProperty("--c", color);
  const url = params.get("ws") || (await daemonUrl());
  client = connect(url, { user, client: "virtual-hq/1" });
  client.onStatus((status, detail) => {
    const region = client.welcome ? client.welcome.region : "";
    if (status === "connected") setStatus(status, `connected · ${region}`);
    else if (status === "reconnecting") setStatus(status, `reconnecting in ${(detail.delay / 1000).toFixed(1)} s`);
    else setStatus(status, detail.reason ? `closed: ${detail.reason}` : status);
  });
  client.onState((r) => r === room && render());
  client.onDiff((r) => r === room && render());
  client.onBroadcast((r, event, data, from) => {
    if (r === room && event === "chat" && data && typeof data.text === "string") {
      say({ from: from.user, region: from.region, text: data.text, kind: "room" });
    }
  });
  client.onMessage((message) => {
    const text = message.data && typeof message.data.text === "string" ? message.data.text : JSON.stringify(message.data);
    say({ from: message.from, region: message.region, text, kind: "dm-in", id: message.id });
    readWhenSeen(message.id);
  });
  client.onError((error) => say({ text: `${error.code}: ${error.frame?.message ?? ""}`, kind: "system" }));
  setInterval(measureLatency, 2000);
  document.addEventListener("visibilitychange", () => readWhenSeen());
  floor.addEventListener("pointermove", onMove);
  floor.addEventListener("pointerleave", () => client.update(room, { x: null, y: null }));
  $("compose").addEventListener("submit", onSend);
  window.addEventListener("pagehide", () => client.close());
  await client.join(room, { name: user, color, x: null, y: null });
  measureLatency();
}

async function daemonUrl() {
  try {
    const response = await fetch("client.json", { cache: "no-store" });
    if (response.ok) return (await response.json()).websocket;
  } catch {
    // not served by a daemon (a file, a plain static server): try the default port
  }
  return `ws://${location.hostname || "127.0.0.1"}:7400/`;
}

// ------------------------------------------------------------------ the floor

function onMove(event) {
  const box = floor.getBoundingClientRect();
  const x = clamp((event.clientX - box.left) / box.width);
  const y = clamp((event.clientY - box.top) / box.height);
  client.update(room, { x: round(x), y: round(y) });
  $("hint").hidden = true;
}

function render() {
  const presences = client.presences(room);
  const mine = client.session;
  const live = new Set();
  for (const [name, sessions] of Object.entries(presences)) {
    for (const entry of sessions) {
      if (entry.session === mine) continue;
      live.add(entry.session);
      drawCursor(name, entry);
    }
  }
  for (const [session, element] of cursors) {
    if (!live.has(session)) {
      element.remove();
      cursors.delete(session);
    }
  }
  renderOnline(presences);
}

function drawCursor(name, { session, meta, region }) {
  let element = cursors.get(session);
  if (!element) {
    element = document.createElement("div");
    element.className = "cursor";
    element.dataset.testid = `cursor-${name}`;
    element.dataset.session = session;
    element.innerHTML =
      '<svg viewBox="0 0 16 20" aria-hidden="true"><path d="M1 1 L1 16 L5 12 L8 19 L11 18 L8 11 L14 11 Z"/></svg>' +
      '<span class="tag"><span class="name"></span><span class="region"></span></span>';
    $("cursors").append(element);
    cursors.set(session, element);
  }
  const c = typeof meta.color === "string" ? meta.color : colorOf(name);
  element.style.setProperty("--c", c);
  element.querySelector(".name").textContent = String(meta.name || name);
  element.querySelector(".region").textContent = region;
  const placed = Number.isFinite(meta.x) && Number.isFinite(meta.y);
  element.hidden = !placed;
  if (placed) {
    element.style.left = `${(clamp(meta.x) * 100).toFixed(2)}%`;
    element.style.top = `${(clamp(meta.y) * 100).toFixed(2)}%`;
  }
}

function renderOnline(presences) {
  const list = $("online");
  const names = Object.keys(presences).sort((a, b) => (a === user ? -1 : b === user ? 1 : a.localeCompare(b)));
  list.replaceChildren(
    ...names.map((name) => {
      const sessions = presences[name];
      const regions = [...new Set(sessions.map((s) => s.region))].sort();
      const item = document.createElement("li");
      item.dataset.testid = `online-${name}`;
      item.dataset.sessions = String(sessions.length);
      item.style.setProperty("--c", sessions[0].meta.color || colorOf(name));
      item.innerHTML = '<span class="dot"></span><span class="who"></span><span class="where"></span>';
      item.querySelector(".who").textContent = name === user ? `${name} (you)` : name;
      item.querySelector(".where").textContent =
        regions.join(" · ") + (sessions.length > 1 ? ` · ${sessions.length} tabs` : "");
      if (name !== user) {
        item.title = `Message ${name}`;
        item.classList.add("pickable");
        item.addEventListener("click", () => pickTarget(name));
      }
      return item;
    })
  );
  $("online-count").textContent = String(names.length);
  syncTargets(names.filter((n) => n !== user));
}

// ------------------------------------------------------------------ chat

function syncTargets(names) {
  const select = $("to");
  for (const name of names) {
    if (chatTargets.has(name)) continue;
    chatTargets.add(name);
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `→ ${name}`;
    select.append(option);
  }
}

function pickTarget(name) {
  syncTargets([name]);
  $("to").value = name;
  $("text").focus();
}

function onSend(event) {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text) return;
  const to = $("to").value;
  input.value = "";
  if (!to) {
    client.broadcast(room, "chat", { text });
    say({ from: user, region: client.welcome?.region, text, kind: "room" });
    return;
  }
  const sent = client.send(to, { text }, { mode: "reliable" });
  const line = say({ from: user, to, text, kind: "dm-out" });
  const mark = line.querySelector(".mark");
  const show = () => {
    const state = sent.status(to);
    line.dataset.state = state;
    line.dataset.id = sent.id || "";
    const error = sent.errors.get(to);
    mark.textContent = { sending: "…", stored: "○", delivered: "✓", read: "✓✓", failed: "✗" }[state];
    mark.title = error ? error.message : state;
  };
  sent.on("change", show);
  sent.catch(show);
  show();
}

function say({ from, to, region, text, kind, id }) {
  const line = document.createElement("li");
  line.className = kind;
  line.dataset.testid = kind === "room" ? "chat-line" : kind;
  if (id) line.dataset.id = id;
  const who = document.createElement("span");
  who.className = "who";
  if (from) who.style.setProperty("--c", colorOf(from));
  who.textContent =
    kind === "dm-out" ? `you → ${to}` : kind === "dm-in" ? `${from} → you` : kind === "system" ? "⚠" : from;
  if (region && kind !== "dm-out") who.title = `via ${region}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  line.append(who, body);
  if (kind === "dm-out") {
    const mark = document.createElement("span");
    mark.className = "mark";
    line.append(mark);
  }
  if (kind === "dm-in") who.addEventListener("click", () => pickTarget(from));
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  log.append(line);
  while (log.children.length > 200) log.firstElementChild.remove();
  if (atBottom) log.scrollTop = log.scrollHeight;
  return line;
}

/** Read receipts for direct messages once the page is actually visible. */
function readWhenSeen(id) {
  if (id) unread.push(id);
  if (document.visibilityState !== "visible") return;
  for (const message of unread.splice(0)) client.markRead(message);
}

// ------------------------------------------------------------------ status bar

async function measureLatency() {
  if (!client || client.status !== "connected") {
    $("latency").textContent = "–";
    return;
  }
  try {
    const ms = await client.ping();
    $("latency").textContent = ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
  } catch {
    $("latency").textContent = "–";
  }
}

function setStatus(status, text) {
  const element = $("status");
  element.dataset.status = status;
  element.textContent = text;
}

// ------------------------------------------------------------------ helpers

function clamp(value) {
  return Math.min(1, Math.max(0, value));
}

function round(value) {
  return Math.round(value * 10000) / 10000;
}

function colorOf(name) {
  let hash = 0;
  for (const char of String(name)) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return `hsl(${hash % 360} 65% 40%)`; // dark enough for white text
}

function rememberedName() {
  const key = "presenced-vhq-user";
  let name = sessionStorage.getItem(key);
  if (!name) {
    const adjectives = ["amber", "brave", "calm", "daring", "eager", "fuzzy", "gentle", "happy", "jolly", "keen", "lucky", "merry", "nimble", "quiet", "rapid", "sunny", "witty", "zesty"];
    const animals = ["otter", "panda", "heron", "lynx", "koala", "finch", "tapir", "gecko", "bison", "quokka", "raven", "walrus", "yak", "fox", "owl", "seal"];
    const pick = (list) => list[Math.floor(Math.random() * list.length)];
    name = `${pick(adjectives)}-${pick(animals)}`;
    sessionStorage.setItem(key, name);
  }
  return name;
}
