// Tests of presenced.js that need no daemon and no browser: `node --test presenced/web/`.
// The presence-map functions are pure; the client is driven through a fake WebSocket.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  applyPatch,
  backoff,
  connect,
  list,
  metaPatch,
  PresencedError,
  syncDiff,
  syncState,
} from "./presenced.js";

const s = (session, meta = {}, region = "eu") => ({ session, meta, region });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function recorder() {
  const calls = [];
  return {
    calls,
    onJoin: (user, current, joined) => calls.push(["join", user, current, joined]),
    onLeave: (user, remaining, left) => calls.push(["leave", user, remaining, left]),
  };
}

// ------------------------------------------------------------------ presence maps

test("syncState from empty reports every user as joined", () => {
  const r = recorder();
  const state = { ann: [s("a1", { x: 1 })], bob: [s("b1"), s("b2", {}, "us")] };
  const next = syncState({}, state, r.onJoin, r.onLeave);
  assert.deepEqual(next, state);
  assert.notEqual(next.ann, state.ann, "a copy, not the frame's objects");
  assert.deepEqual(r.calls, [
    ["join", "ann", [], [s("a1", { x: 1 })]],
    ["join", "bob", [], [s("b1"), s("b2", {}, "us")]],
  ]);
});

test("syncState replacing a map reports sessions gone and new, not kept ones", () => {
  const r = recorder();
  const before = { ann: [s("a1")], bob: [s("b1"), s("b2")], cat: [s("c1")] };
  const after = { ann: [s("a1", { x: 5 })], bob: [s("b2"), s("b3")], dan: [s("d1")] };
  const frozen = structuredClone(before);
  const next = syncState(before, after, r.onJoin, r.onLeave);
  assert.deepEqual(before, frozen, "pure: the old map is untouched");
  assert.deepEqual(next, after);
  assert.deepEqual(r.calls, [
    ["leave", "bob", [s("b2"), s("b3")], [s("b1")]],
    ["leave", "cat", [], [s("c1")]],
    ["join", "bob", [s("b1"), s("b2")], [s("b3")]],
    ["join", "dan", [], [s("d1")]],
  ]);
});

test("syncDiff: joins, updates and leaves, with several sessions per user", () => {
  const r = recorder();
  let map = syncDiff(
    {},
    { joins: { ann: [s("a1", { name: "Ann" })] }, leaves: {}, updates: {} },
    r.onJoin,
    r.onLeave
  );
  assert.deepEqual(map, { ann: [s("a1", { name: "Ann" })] });
  // A second tab of the same user: one user, two sessions.
  map = syncDiff(map, { joins: { ann: [s("a2", { name: "Ann" }, "us")] } }, r.onJoin, r.onLeave);
  assert.deepEqual(Object.keys(map), ["ann"]);
  assert.equal(map.ann.length, 2);
  // An update replaces that session's meta only.
  const before = structuredClone(map);
  map = syncDiff(map, { updates: { ann: [s("a1", { name: "Ann", x: 0.5 })] } }, r.onJoin);
  assert.deepEqual(map.ann[0].meta, { name: "Ann", x: 0.5 });
  assert.deepEqual(map.ann[1], s("a2", { name: "Ann" }, "us"));
  // One tab closes: the user stays with the other.
  map = syncDiff(map, { leaves: { ann: [s("a1", { name: "Ann", x: 0.6 })] } }, r.onJoin, r.onLeave);
  assert.deepEqual(map, { ann: [s("a2", { name: "Ann" }, "us")] });
  // The last one closes: the user is gone.
  map = syncDiff(map, { leaves: { ann: [s("a2", { name: "Ann", x: 1 }, "us")] } }, r.onJoin, r.onLeave);
  assert.deepEqual(map, {});
  assert.deepEqual(r.calls, [
    ["join", "ann", [], [s("a1", { name: "Ann" })]],
    ["join", "ann", [s("a1", { name: "Ann" })], [s("a2", { name: "Ann" }, "us")]],
    // the leave reports the last meta the daemon saw
    ["leave", "ann", [s("a2", { name: "Ann" }, "us")], [s("a1", { name: "Ann", x: 0.6 })]],
    ["leave", "ann", [], [s("a2", { name: "Ann", x: 1 }, "us")]],
  ]);
  assert.deepEqual(before.ann[0].meta, { name: "Ann" }, "pure: earlier maps are untouched");
});

test("syncDiff: a join of a known session replaces it; unknown updates join; unknown leaves are ignored", () => {
  const r = recorder();
  let map = { ann: [s("a1", { x: 1 })] };
  map = syncDiff(map, { joins: { ann: [s("a1", { x: 2 })] } }, r.onJoin, r.onLeave);
  assert.deepEqual(map, { ann: [s("a1", { x: 2 })] });
  map = syncDiff(map, { updates: { bob: [s("b1", { y: 3 })] } }, r.onJoin, r.onLeave);
  assert.deepEqual(map.bob, [s("b1", { y: 3 })]);
  map = syncDiff(map, { leaves: { cat: [s("c1")], ann: [s("zz")] } }, r.onJoin, r.onLeave);
  assert.deepEqual(Object.keys(map).sort(), ["ann", "bob"]);
  assert.deepEqual(r.calls, [["join", "bob", [], [s("b1", { y: 3 })]]]);
});

test("syncDiff with joins, updates and leaves of different users in one diff", () => {
  const map = syncDiff(
    { ann: [s("a1")], bob: [s("b1")] },
    {
      joins: { cat: [s("c1")] },
      updates: { ann: [s("a1", { x: 9 })] },
      leaves: { bob: [s("b1")] },
    }
  );
  assert.deepEqual(map, { ann: [s("a1", { x: 9 })], cat: [s("c1")] });
});

test("list, applyPatch and backoff", () => {
  const map = { ann: [s("a1"), s("a2")], bob: [s("b1")] };
  assert.deepEqual(
    list(map, (user, sessions) => `${user}:${sessions.length}`),
    ["ann:2", "bob:1"]
  );
  assert.deepEqual(applyPatch({ a: 1, b: 2 }, { b: null, c: 3 }), { a: 1, c: 3 });
  for (let attempt = 0; attempt < 40; attempt++) {
    const ceiling = Math.min(10000, 250 * 2 ** attempt);
    assert.equal(backoff(attempt, { random: () => 0 }), ceiling / 2);
    assert.equal(backoff(attempt, { random: () => 1 }), ceiling);
  }
});

// ------------------------------------------------------------------ the client, on a fake socket

class FakeSocket {
  static all = [];

  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.readyState = 0;
    this.frames = [];
    FakeSocket.all.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.();
    }, 0);
  }

  send(text) {
    this.frames.push(JSON.parse(text));
  }

  close(code = 1000) {
    this.closedWith = code; // what the client sent: 1000 is a clean close
    this.drop(code);
  }

  // --- the "daemon" side
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code = 1006) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }

  sent(type) {
    return this.frames.filter((f) => f.type === type);
  }

  last(type) {
    return this.sent(type).at(-1);
  }
}

async function until(predicate, what = "condition", ms = 2000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

async function greeted(client, session = "S1", tick = 20, extra = {}) {
  const fresh = () => FakeSocket.all.find((f) => !f.greeted && f.sent("hello").length === 1);
  await until(fresh, "hello on a new socket");
  const socket = fresh();
  socket.greeted = true;
  const hello = socket.last("hello");
  socket.receive({ type: "welcome", ref: hello.ref, session, user: "ann", tick_ms: tick, ...extra });
  await until(() => client.status === "connected", "connected");
  return socket;
}

test("client: hello, join, diffs, callbacks", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", { user: "ann", WebSocket: FakeSocket });
  const statuses = [];
  client.onStatus((status) => statuses.push(status));
  const events = [];
  client.onJoin((room, user) => events.push(["join", room, user]));
  client.onLeave((room, user, remaining) => events.push(["leave", room, user, remaining.length]));
  const diffs = [];
  client.onDiff((room, diff) => diffs.push([room, diff]));
  const joined = client.join("hq", { name: "Ann" }); // before the connection is up
  const socket = await greeted(client);
  assert.equal(socket.protocol, "presenced.v1");
  assert.equal(socket.last("hello").user, "ann");
  const join = socket.last("join");
  assert.deepEqual(join.meta, { name: "Ann" });
  socket.receive({ type: "state", ref: join.ref, room: "hq", presences: { bob: [s("b1")] } });
  assert.deepEqual(await joined, { bob: [s("b1")] });
  socket.receive({
    type: "diff",
    room: "hq",
    joins: { ann: [s("S1", { name: "Ann" })] },
    leaves: { bob: [s("b1")] },
    updates: {},
  });
  assert.deepEqual(client.presences("hq"), { ann: [s("S1", { name: "Ann" })] });
  assert.deepEqual(events, [
    ["join", "hq", "bob"],
    ["join", "hq", "ann"],
    ["leave", "hq", "bob", 0],
  ]);
  assert.equal(diffs.length, 1);
  assert.deepEqual(statuses, ["connected"]);
  client.close();
  assert.equal(client.status, "closed");
});

test("client: an error answering a join rejects it", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", { user: "ann", WebSocket: FakeSocket });
  const socket = await greeted(client);
  const joining = client.join("secret", {});
  const join = socket.last("join");
  socket.receive({ type: "error", ref: join.ref, code: "forbidden", message: "no" });
  await assert.rejects(joining, (e) => e instanceof PresencedError && e.code === "forbidden");
  assert.deepEqual(client.rooms(), []);
  client.close();
});

test("client: updates are throttled to the tick, merged, with the trailing edge sent", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", { user: "ann", WebSocket: FakeSocket });
  const socket = await greeted(client, "S1", 40);
  const joined = client.join("hq", { name: "Ann" });
  socket.receive({ type: "state", ref: socket.last("join").ref, room: "hq", presences: {} });
  await joined;
  client.update("hq", { x: 1, y: 1 });
  assert.equal(socket.sent("update").length, 1, "the first update goes at once");
  client.update("hq", { x: 2 });
  client.update("hq", { y: 3, z: 1 });
  client.update("hq", { z: null });
  assert.equal(socket.sent("update").length, 1, "later ones within the tick wait");
  await until(() => socket.sent("update").length === 2, "the trailing update");
  assert.deepEqual(socket.last("update").meta, { x: 2, y: 3, z: null });
  await sleep(60);
  assert.equal(socket.sent("update").length, 2, "nothing more to send");
  const started = performance.now();
  for (let i = 0; i < 50; i++) {
    client.update("hq", { x: i });
    await sleep(2);
  }
  await sleep(50);
  const elapsed = performance.now() - started;
  const updates = socket.sent("update").slice(2);
  assert.ok(updates.length <= Math.ceil(elapsed / 40) + 1, `${updates.length} in ${elapsed} ms`);
  assert.deepEqual(updates.at(-1).meta, { x: 49 }, "the last patch always goes out");
  client.close();
});

test("client: reconnects with backoff, rejoins with the latest meta, replaces the map", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", {
    user: "ann",
    WebSocket: FakeSocket,
    backoffBase: 20,
    backoffMax: 40,
  });
  const statuses = [];
  client.onStatus((status) => statuses.push(status));
  const left = [];
  client.onLeave((room, user) => left.push(user));
  const states = [];
  client.onState((room, presences) => states.push(Object.keys(presences).sort()));
  const first = await greeted(client, "S1");
  const joined = client.join("hq", { name: "Ann", x: 0 });
  first.receive({
    type: "state",
    ref: first.last("join").ref,
    room: "hq",
    presences: { ann: [s("S1")], bob: [s("b1")] },
  });
  await joined;
  const pinging = client.ping();
  first.drop(1006);
  await assert.rejects(pinging, (e) => e.code === "closed");
  assert.equal(client.status, "reconnecting");
  client.update("hq", { x: 0.25, y: 0.5 }); // while disconnected: carried by the rejoin
  const broadcastWhileDown = { text: "queued" };
  client.broadcast("hq", "chat", broadcastWhileDown);
  const second = await greeted(client, "S2");
  assert.equal(FakeSocket.all.length, 2);
  const rejoin = second.last("join");
  assert.deepEqual(rejoin.meta, { name: "Ann", x: 0.25, y: 0.5 });
  assert.equal(second.sent("broadcast").length, 0, "broadcasts wait for the room");
  second.receive({
    type: "state",
    ref: rejoin.ref,
    room: "hq",
    presences: { ann: [s("S2")], cat: [s("c1")] },
  });
  assert.deepEqual(client.presences("hq"), { ann: [s("S2")], cat: [s("c1")] });
  assert.deepEqual(left.sort(), ["ann", "bob"], "the old session and bob left");
  assert.deepEqual(states, [["ann", "bob"], ["ann", "cat"]]);
  assert.deepEqual(second.last("broadcast").data, broadcastWhileDown);
  assert.equal(second.sent("update").length, 0, "the rejoin carried the update");
  assert.deepEqual(statuses, ["connected", "reconnecting", "connected"]);
  // A policy close (1008) is final.
  second.drop(1008);
  assert.equal(client.status, "closed");
  await sleep(100);
  assert.equal(FakeSocket.all.length, 2, "no reconnect after 1008");
});

test("client: direct messages, receipts, dedup, fetch", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", { user: "ann", WebSocket: FakeSocket });
  const socket = await greeted(client);
  // reliable: resolves on stored; receipts update it
  const sent = client.send("bob", { text: "hi" }, { mode: "reliable" });
  const frame = socket.last("send");
  assert.deepEqual([frame.to, frame.mode, frame.data], ["bob", "reliable", { text: "hi" }]);
  assert.equal(sent.status("bob"), "sending");
  const seen = [];
  sent.on("delivered", (d) => seen.push(["delivered", d.to, d.region]));
  sent.on("read", (d) => seen.push(["read", d.by]));
  socket.receive({ type: "stored", ref: frame.ref, id: "eu.x.1" });
  assert.equal(await sent, "eu.x.1");
  assert.equal(sent.status("bob"), "stored");
  socket.receive({ type: "delivered", ref: frame.ref, id: "eu.x.1", to: "bob", region: "us" });
  await sent.delivered;
  assert.equal(sent.status(), "delivered");
  // a receipt without ref (sent to another session of ours) is matched by id
  socket.receive({ type: "read", id: "eu.x.1", by: "bob" });
  await sent.read;
  assert.equal(sent.status(), "read");
  assert.deepEqual(seen, [
    ["delivered", "bob", "us"],
    ["read", "bob"],
  ]);
  // fast: resolves on the first delivered; a group with one failure
  const group = client.send(["bob", "cat"], "yo");
  const g = socket.last("send");
  assert.equal(g.mode, "fast");
  socket.receive({ type: "error", ref: g.ref, id: "eu.x.2", to: "cat", code: "not_online", message: "cat is not online" });
  socket.receive({ type: "delivered", ref: g.ref, id: "eu.x.2", to: "bob", region: "eu" });
  assert.equal(await group, "eu.x.2");
  await assert.rejects(group.delivered, (e) => e.code === "not_online" && e.frame.to === "cat");
  assert.equal(group.status("cat"), "failed");
  assert.equal(group.status("bob"), "delivered");
  // fast to nobody online: the send itself rejects
  const lonely = client.send("dan", "?");
  const l = socket.last("send");
  socket.receive({ type: "error", ref: l.ref, id: "eu.x.3", to: "dan", code: "not_online", message: "no" });
  await assert.rejects(lonely, (e) => e.code === "not_online");
  // a request-level error rejects too
  const full = client.send("bob", "x", { mode: "reliable" });
  socket.receive({ type: "error", ref: socket.last("send").ref, code: "store_full", message: "full" });
  await assert.rejects(full, (e) => e.code === "store_full");
  // incoming messages: each id once
  const got = [];
  client.onMessage((m) => got.push(m.id));
  const message = { type: "message", id: "us.y.1", from: "bob", region: "us", data: "hey", mode: "reliable" };
  socket.receive(message);
  socket.receive(message);
  socket.receive({ ...message, id: "us.y.2" });
  assert.deepEqual(got, ["us.y.1", "us.y.2"]);
  client.markRead("us.y.1");
  assert.deepEqual(socket.last("read"), { type: "read", id: "us.y.1" });
  // fetch resolves on fetched
  const fetching = client.fetch(10);
  await until(() => socket.sent("fetch").length === 1, "fetch");
  const f = socket.last("fetch");
  assert.equal(f.limit, 10);
  socket.receive({ type: "fetched", ref: f.ref, count: 0, remaining: 0, complete: true });
  assert.deepEqual(await fetching, { count: 0, remaining: 0, complete: true });
  // an incomplete answer says so, with when to ask again
  const partial = client.fetch(10);
  await until(() => socket.sent("fetch").length === 2, "second fetch");
  socket.receive({
    type: "fetched", ref: socket.last("fetch").ref, count: 3, remaining: 0,
    complete: false, retry_after_ms: 500,
  });
  assert.deepEqual(await partial, { count: 3, remaining: 0, complete: false, retryAfterMs: 500 });
  client.close();
});

test("client: pings measure the round trip; broadcasts reach onBroadcast", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", { user: "ann", WebSocket: FakeSocket });
  const socket = await greeted(client);
  const pinging = client.ping();
  const ping = socket.last("ping");
  await sleep(15);
  socket.receive({ type: "pong", ref: ping.ref, t: ping.t, server_time: Date.now() });
  const ms = await pinging;
  assert.ok(ms >= 10 && ms < 1000, `${ms}`);
  const got = [];
  client.onBroadcast((room, event, data, from) => got.push([room, event, data, from.user]));
  socket.receive({ type: "broadcast", room: "hq", event: "chat", data: { t: 1 }, from: { user: "bob" } });
  assert.deepEqual(got, [["hq", "chat", { t: 1 }, "bob"]]);
  client.close();
  await assert.rejects(client.ping(), (e) => e.code === "closed");
});

test("client: close() fails what still waits, and stops for good", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", { user: "ann", WebSocket: FakeSocket });
  const joining = client.join("hq", {}); // never answered
  const sending = client.send("bob", "queued"); // not connected yet: queued
  client.close();
  await assert.rejects(joining, (e) => e.code === "closed");
  await assert.rejects(sending, (e) => e.code === "closed");
  await assert.rejects(client.join("other"), (e) => e.code === "closed");
  assert.equal(client.status, "closed");
  await sleep(20);
  assert.equal(FakeSocket.all.length, 1);
});

// ------------------------------------------------------------------ resuming a dropped session

const resumable = (resume, resumed) => ({ resume, resumed, resume_grace_ms: 10000 });

/** A client joined to "hq" (ann S1 with bob) on a first connection that offered token R1. */
async function joinedHq(events) {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", {
    user: "ann",
    WebSocket: FakeSocket,
    backoffBase: 10,
    backoffMax: 20,
  });
  client.onJoin((room, user, current, joined) => events.push(["join", user, joined.map((x) => x.session)]));
  client.onLeave((room, user, remaining, left) => events.push(["leave", user, left.map((x) => x.session)]));
  const first = await greeted(client, "S1", 20, resumable("R1", false));
  assert.equal(first.last("hello").resume, undefined, "nothing to resume on a first connect");
  const joined = client.join("hq", { name: "Ann" });
  first.receive({
    type: "state",
    ref: first.last("join").ref,
    room: "hq",
    presences: { ann: [s("S1", { name: "Ann" })], bob: [s("b1")] },
  });
  await joined;
  return { client, first };
}

test("metaPatch: set, changed and removed keys", () => {
  assert.equal(metaPatch({ a: 1, n: { x: 1 } }, { a: 1, n: { x: 1 } }), null);
  assert.deepEqual(metaPatch({ a: 1, b: 2, n: { x: 1 } }, { a: 5, n: { x: 2 }, c: 3 }), {
    a: 5,
    n: { x: 2 },
    c: 3,
    b: null,
  });
  assert.deepEqual(applyPatch({ a: 1, b: 2 }, metaPatch({ a: 1, b: 2 }, { a: 2 })), { a: 2 });
});

test("client: resumes after a drop: same session, no rejoin, the state only adds what changed", async () => {
  const events = [];
  const { client, first } = await joinedHq(events);
  const statuses = [];
  client.onStatus((status, detail) => statuses.push([status, detail.resumed]));
  const side = client.join("side", {});
  first.receive({ type: "state", ref: first.last("join").ref, room: "side", presences: {} });
  await side;
  events.length = 0;

  first.drop(1006);
  client.update("hq", { x: 1 }); // while disconnected
  await client.leave("side"); // while disconnected: resolves at once
  const second = await greeted(client, "S1", 20, resumable("R2", true));
  assert.equal(second.last("hello").resume, "R1", "the token of the last welcome");
  assert.equal(client.session, "S1");
  assert.deepEqual(second.sent("join"), [], "a resumed session is still in its rooms");
  assert.deepEqual(
    second.sent("leave").map((f) => f.room),
    ["side"],
    "a room left while disconnected is left on the daemon too"
  );
  // The daemon's fresh state: bob left and cat came meanwhile; ann is the same session.
  second.receive({
    type: "state",
    ref: null,
    room: "hq",
    presences: { ann: [s("S1", { name: "Ann" })], cat: [s("c1")] },
  });
  assert.deepEqual(client.presences("hq"), { ann: [s("S1", { name: "Ann" })], cat: [s("c1")] });
  assert.deepEqual(events, [
    ["leave", "bob", ["b1"]],
    ["join", "cat", ["c1"]],
  ]);
  // The daemon's copy of our meta lacks the offline update: the client sends it.
  await until(() => second.sent("update").length === 1, "the offline update");
  assert.deepEqual(second.last("update"), { type: "update", room: "hq", meta: { x: 1 } });
  // The ping after the states is answered: nothing left to rejoin.
  const ping = second.last("ping");
  second.receive({ type: "pong", ref: ping.ref, t: ping.t, server_time: Date.now() });
  await sleep(10);
  assert.deepEqual(second.sent("join"), []);
  // The room is live: diffs apply, broadcasts go out at once.
  second.receive({ type: "diff", room: "hq", joins: {}, leaves: { cat: [s("c1")] }, updates: {} });
  assert.deepEqual(Object.keys(client.presences("hq")), ["ann"]);
  client.broadcast("hq", "chat", "hi");
  assert.equal(second.sent("broadcast").length, 1);
  assert.deepEqual(statuses, [
    ["reconnecting", undefined],
    ["connected", true],
  ]);
  client.close();
  assert.equal(second.closedWith, 1000, "close() is a clean close: the daemon drops the session");
});

test("client: a refused resume (new session) joins every room again", async () => {
  const events = [];
  const { client, first } = await joinedHq(events);
  events.length = 0;
  client.update("hq", { x: 2 });
  first.drop(1006);
  const second = await greeted(client, "S2", 20, resumable("R9", false));
  assert.equal(second.last("hello").resume, "R1");
  assert.equal(client.session, "S2");
  const rejoin = second.last("join");
  assert.deepEqual([rejoin.room, rejoin.meta], ["hq", { name: "Ann", x: 2 }]);
  second.receive({
    type: "state",
    ref: rejoin.ref,
    room: "hq",
    presences: { ann: [s("S2", { name: "Ann", x: 2 })], bob: [s("b1")] },
  });
  assert.deepEqual(events, [
    ["leave", "ann", ["S1"]],
    ["join", "ann", ["S2"]],
  ]);
  // The next reconnect offers the newest token.
  second.drop(1006);
  const third = await greeted(client, "S2", 20, resumable("R10", true));
  assert.equal(third.last("hello").resume, "R9");
  client.close();
});

test("client: after a resume, a room without its state, or joined again offline, is joined", async () => {
  const events = [];
  const { client, first } = await joinedHq(events);
  const lobby = client.join("lobby", { a: 1 });
  first.receive({ type: "state", ref: first.last("join").ref, room: "lobby", presences: {} });
  await lobby;
  const inFlight = client.join("pending", {}); // never answered before the drop
  first.drop(1006);
  const rejoined = client.join("lobby", { a: 2 }); // a new meta while disconnected
  const second = await greeted(client, "S1", 20, resumable("R2", true));
  assert.deepEqual(
    second.sent("join").map((f) => [f.room, f.meta]),
    [
      ["lobby", { a: 2 }],
      ["pending", {}],
    ]
  );
  for (const join of second.sent("join")) {
    second.receive({ type: "state", ref: join.ref, room: join.room, presences: {} });
  }
  await rejoined;
  await inFlight;
  // No state came for hq before the pong: the session is not in it any more.
  const ping = second.last("ping");
  second.receive({ type: "pong", ref: ping.ref, t: ping.t, server_time: Date.now() });
  await until(() => second.sent("join").length === 3, "hq joined again");
  assert.deepEqual(second.last("join").room, "hq");
  assert.deepEqual(second.last("join").meta, { name: "Ann" });
  client.close();
});

test("client: a resumed room's state read right after the welcome (same tick) is taken", async () => {
  const events = [];
  const { client, first } = await joinedHq(events);
  events.length = 0;
  first.drop(1006);
  await until(() => FakeSocket.all.length === 2 && FakeSocket.all[1].sent("hello").length === 1);
  const second = FakeSocket.all[1];
  const hello = second.last("hello");
  // Both frames in one read, as a socket library may deliver them: no await in between.
  second.receive({ type: "welcome", ref: hello.ref, session: "S1", user: "ann", ...resumable("R2", true) });
  second.receive({ type: "state", ref: null, room: "hq", presences: { ann: [s("S1", { name: "Ann" })] } });
  await until(() => client.status === "connected", "connected");
  const ping = second.last("ping");
  second.receive({ type: "pong", ref: ping.ref, t: ping.t, server_time: Date.now() });
  await sleep(10);
  assert.deepEqual(second.sent("join"), [], "the state was not missed");
  assert.deepEqual(events, [["leave", "bob", ["b1"]]]);
  client.update("hq", { x: 3 });
  assert.deepEqual(second.last("update").meta, { x: 3 }, "the room is live");
  client.close();
});

test("client: getToken gives each hello's token and refreshes it before it expires", async () => {
  FakeSocket.all = [];
  let issued = 0;
  const getToken = async () => `token-${++issued}`;
  const client = connect("ws://daemon/", { getToken, WebSocket: FakeSocket, backoffBase: 5 });
  const errors = [];
  client.onError((error) => errors.push(error.code));
  const first = await greeted(client, "S1", 20, { expires_in_ms: 50 });
  assert.equal(first.last("hello").token, "token-1");
  await until(() => first.sent("refresh").length === 1, "a refresh at 80 % of 50 ms");
  const refresh = first.last("refresh");
  assert.equal(refresh.token, "token-2");
  first.receive({ type: "refreshed", ref: refresh.ref, expires_in_ms: 30 });
  await until(() => first.sent("refresh").length === 2, "the next refresh");
  assert.equal(client.refreshes, 1);
  // A refused refresh: reported, and no more refreshes on this session.
  first.receive({ type: "error", ref: first.last("refresh").ref, code: "unauthorized", message: "no" });
  await sleep(60);
  assert.equal(first.sent("refresh").length, 2);
  assert.deepEqual(errors, ["unauthorized"]);
  // The daemon closes the session for its expired token (4003): not final, a reconnect
  // says hello with a fresh token.
  first.receive({ type: "error", code: "token_expired", message: "expired" });
  first.drop(4003);
  const second = await greeted(client, "S2");
  assert.equal(second.last("hello").token, "token-4");
  assert.equal(client.status, "connected");
  await sleep(30);
  assert.equal(second.sent("refresh").length, 0, "no expiry in this welcome: no refresh");
  client.close();
});

test("client: a getToken that fails drops the socket and tries again", async () => {
  FakeSocket.all = [];
  let calls = 0;
  const getToken = () => {
    calls += 1;
    if (calls === 1) throw new Error("identity provider down");
    return "fresh";
  };
  const client = connect("ws://daemon/", { getToken, WebSocket: FakeSocket, backoffBase: 5 });
  const socket = await greeted(client);
  assert.equal(socket.last("hello").token, "fresh");
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(FakeSocket.all[0].sent("hello").length, 0);
  client.close();
});

test("client: watch a room's counts, watched again after a reconnect, leave ends it", async () => {
  FakeSocket.all = [];
  const client = connect("ws://daemon/", {
    user: "ann",
    WebSocket: FakeSocket,
    backoffBase: 20,
    backoffMax: 40,
  });
  const seen = [];
  client.watch("hall", (counts, room) => seen.push([room, counts.sessions, counts.users]));
  const first = await greeted(client, "S1");
  assert.deepEqual(first.last("join"), { type: "join", room: "hall", view: "count" });
  first.receive({ type: "occupancy", room: "hall", sessions: 3, users: 2 });
  first.receive({ type: "occupancy", room: "hall", sessions: 4, users: 3 });
  assert.deepEqual(client.occupancy("hall"), { sessions: 4, users: 3 });
  assert.deepEqual(client.rooms(), [], "a watcher is in no room");
  first.drop(1006);
  const second = await greeted(client, "S1", 20, { resumed: true });
  assert.deepEqual(second.last("join"), { type: "join", room: "hall", view: "count" });
  second.receive({ type: "occupancy", room: "hall", sessions: 5, users: 3 });
  const leaving = client.leave("hall");
  const leave = second.last("leave");
  assert.equal(leave.room, "hall");
  second.receive({ type: "left", ref: leave.ref, room: "hall" });
  await leaving;
  second.receive({ type: "occupancy", room: "hall", sessions: 9, users: 9 }); // late: ignored
  assert.equal(client.occupancy("hall"), null);
  assert.deepEqual(seen, [
    ["hall", 3, 2],
    ["hall", 4, 3],
    ["hall", 5, 3],
  ]);
  client.close();
});
