// presenced.js: the browser (and Node) client of presenced. An ES module with no dependencies
// and no build step. The wire protocol is in docs/protocol.md.
//
//   import { connect } from "./presenced.js";
//   const client = connect("ws://127.0.0.1:7400/", { user: "ann" });
//   client.onDiff((room, diff) => render(client.presences(room)));
//   await client.join("lobby", { name: "Ann" });
//   client.update("lobby", { x: 0.3, y: 0.7 });          // throttled to the server's tick
//   const sent = client.send("bob", { text: "hi" }, { mode: "reliable" });
//   await sent;                                          // stored by the daemon: its id
//   sent.on("read", ({ by }) => console.log(by, "read it"));
//
// The client reconnects by itself (exponential backoff with jitter) and offers the daemon the
// `resume` token of its last `welcome`. If the daemon still holds the session (it dropped less
// than the daemon's resume grace ago), it is resumed: same session id, still in every room, so
// nobody saw it leave; the client sends no join, and the daemon's fresh `state` of each room
// replaces its presence map (onJoin/onLeave fire only for what really changed meanwhile). If
// not, it joins every room again with its latest meta and takes the fresh `state` likewise.

/** The subprotocol offered to the daemon. */
export const SUBPROTOCOL = "presenced.v1";

/** Close codes after which reconnecting cannot help (policy: unauthorized, flooding). */
const FATAL_CLOSE_CODES = new Set([1008]);
/** How many message ids are remembered to drop retransmissions. */
const SEEN_IDS = 10000;
/** Longest resume token a daemon sends (and accepts back in `hello`). */
const MAX_RESUME_TOKEN = 128;

/**
 * One session of a user in a room, as the daemon describes it.
 * @typedef {{session: string, meta: Object<string, any>, region: string}} Session
 */
/**
 * A room's presence map: user id -> that user's sessions (one per tab or device).
 * @typedef {Object<string, Session[]>} Presences
 */
/**
 * A `diff` frame's changes: each maps user id -> sessions.
 * @typedef {{joins: Presences, leaves: Presences, updates: Presences}} Diff
 */
/**
 * Called once per user whose sessions were added: `current` is what the map held for the
 * user before (an empty list for a user new to the room), `joined` the added sessions.
 * @callback JoinCallback
 * @param {string} user
 * @param {Session[]} current
 * @param {Session[]} joined
 */
/**
 * Called once per user who lost sessions: `remaining` is what is left of the user (an empty
 * list when the user has gone from the room), `left` the removed sessions (last meta seen).
 * @callback LeaveCallback
 * @param {string} user
 * @param {Session[]} remaining
 * @param {Session[]} left
 */

// ------------------------------------------------------------------------- presence maps

function cloneSession(entry) {
  return { session: entry.session, meta: { ...entry.meta }, region: entry.region };
}

function clonePresences(presences) {
  const out = {};
  for (const [user, sessions] of Object.entries(presences || {})) {
    out[user] = sessions.map(cloneSession);
  }
  return out;
}

/**
 * Replace a room's presence map with a full `state` (a join reply, a resync, a rejoin after
 * reconnecting), calling `onJoin`/`onLeave` for what differs, like Phoenix's
 * `Presence.syncState`. Pure: neither argument is modified.
 * @param {Presences} current the map as it was
 * @param {Presences} incoming the `presences` of the `state` frame
 * @param {JoinCallback} [onJoin]
 * @param {LeaveCallback} [onLeave]
 * @returns {Presences} the new map (a copy of `incoming`)
 */
export function syncState(current, incoming, onJoin, onLeave) {
  const next = clonePresences(incoming);
  for (const [user, sessions] of Object.entries(current || {})) {
    const kept = new Set((next[user] || []).map((s) => s.session));
    const left = sessions.filter((s) => !kept.has(s.session)).map(cloneSession);
    if (left.length && onLeave) onLeave(user, next[user] ? next[user].map(cloneSession) : [], left);
  }
  for (const [user, sessions] of Object.entries(next)) {
    const before = (current && current[user]) || [];
    const known = new Set(before.map((s) => s.session));
    const joined = sessions.filter((s) => !known.has(s.session)).map(cloneSession);
    if (joined.length && onJoin) onJoin(user, before.map(cloneSession), joined);
  }
  return next;
}

/**
 * Apply a `diff` to a room's presence map, like Phoenix's `Presence.syncDiff`: `joins` add
 * sessions, `updates` replace their meta, `leaves` remove them. A join or update of a session
 * already known replaces it (no `onJoin`); an update of an unknown session counts as a join;
 * a leave of an unknown session is ignored. Pure: neither argument is modified.
 * @param {Presences} current
 * @param {Diff} diff
 * @param {JoinCallback} [onJoin]
 * @param {LeaveCallback} [onLeave]
 * @returns {Presences} the new map
 */
export function syncDiff(current, diff, onJoin, onLeave) {
  const next = clonePresences(current);
  const upsert = (changes) => {
    for (const [user, sessions] of Object.entries(changes || {})) {
      const before = (next[user] || []).map(cloneSession);
      const list = next[user] ? next[user] : [];
      const joined = [];
      for (const entry of sessions) {
        const at = list.findIndex((s) => s.session === entry.session);
        if (at >= 0) {
          list[at] = cloneSession(entry);
        } else {
          list.push(cloneSession(entry));
          joined.push(cloneSession(entry));
        }
      }
      if (list.length) next[user] = list;
      if (joined.length && onJoin) onJoin(user, before, joined);
    }
  };
  upsert(diff.joins);
  upsert(diff.updates);
  for (const [user, sessions] of Object.entries(diff.leaves || {})) {
    const list = next[user];
    if (!list) continue;
    const gone = new Set(sessions.map((s) => s.session));
    const left = list.filter((s) => gone.has(s.session));
    if (!left.length) continue;
    const remaining = list.filter((s) => !gone.has(s.session));
    if (remaining.length) next[user] = remaining;
    else delete next[user];
    // The leave carries the last meta the daemon saw: report that one.
    const last = new Map(sessions.map((s) => [s.session, s]));
    if (onLeave) {
      onLeave(
        user,
        remaining.map(cloneSession),
        left.map((s) => cloneSession({ ...s, ...last.get(s.session) }))
      );
    }
  }
  return next;
}

/**
 * Map a presence map to a list, like Phoenix's `Presence.list`.
 * @template T
 * @param {Presences} presences
 * @param {(user: string, sessions: Session[]) => T} [chooser] default: `{user, sessions}`
 * @returns {T[]}
 */
export function list(presences, chooser = (user, sessions) => ({ user, sessions })) {
  return Object.entries(presences || {}).map(([user, sessions]) => chooser(user, sessions));
}

/**
 * Merge a meta patch like the daemon does: keys are set, a key whose value is null is removed.
 * @param {Object<string, any>} meta
 * @param {Object<string, any>} patch
 * @returns {Object<string, any>} a new object
 */
export function applyPatch(meta, patch) {
  const out = { ...meta };
  for (const [key, value] of Object.entries(patch || {})) {
    if (value === null) delete out[key];
    else out[key] = value;
  }
  return out;
}

/**
 * The patch that turns meta `from` into meta `to` (the daemon merges patches with
 * {@link applyPatch}): changed or new keys with their value, removed keys with null. Used after
 * a resume to bring the daemon's copy of this session's meta up to date with the updates made
 * while disconnected (or lost in the drop). Values are compared by their JSON text.
 * @param {Object<string, any>} from
 * @param {Object<string, any>} to
 * @returns {Object<string, any> | null} null when they are the same
 */
export function metaPatch(from, to) {
  const patch = {};
  for (const [key, value] of Object.entries(to || {})) {
    if (!from || !(key in from) || JSON.stringify(from[key]) !== JSON.stringify(value)) {
      patch[key] = value;
    }
  }
  for (const key of Object.keys(from || {})) if (!to || !(key in to)) patch[key] = null;
  return Object.keys(patch).length ? patch : null;
}

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential from `base` ms up to
 * `max` ms, with "equal jitter" (between half and all of it) so that many clients dropped at
 * once do not come back in lockstep.
 * @param {number} attempt
 * @param {{base?: number, max?: number, random?: () => number}} [options]
 * @returns {number} milliseconds
 */
export function backoff(attempt, { base = 250, max = 10000, random = Math.random } = {}) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

// ------------------------------------------------------------------------- errors

/** An `error` frame from the daemon (or a lost connection, code `closed`), as an Error. */
export class PresencedError extends Error {
  /**
   * @param {string} code the protocol's error code (`forbidden`, `not_online`, ...) or `closed`
   * @param {string} message
   * @param {Object} [frame] the error frame, when there is one (it may carry `id` and `to`)
   */
  constructor(code, message, frame) {
    super(`${code}: ${message}`);
    this.name = "PresencedError";
    this.code = code;
    this.frame = frame || null;
  }
}

function errorFrom(frame) {
  return new PresencedError(String(frame.code), String(frame.message || ""), frame);
}

function quiet(promise) {
  promise.catch(() => {}); // rejections a caller ignores are not "unhandled"
  return promise;
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise: quiet(promise), resolve, reject };
}

// ------------------------------------------------------------------------- sent messages

/**
 * A direct message this client sent, and what became of it. Returned by `client.send()`.
 *
 * It is awaitable: `await sent` gives the message id once the daemon accepted it, that is on
 * `stored` for a reliable message, or on the first `delivered` for a fast one, and throws a
 * `PresencedError` if it was refused (`store_full`, `not_online` for every recipient, ...).
 *
 * Per recipient, `sent.status(user)` is `"sending"`, `"stored"`, `"delivered"`, `"read"` or
 * `"failed"`; `sent.on("delivered" | "read" | "error" | "change", callback)` reports each
 * receipt as it comes (`{to, region}`, `{by}`, `PresencedError` with `.frame.to`, this object),
 * and `sent.delivered` / `sent.read` are promises of every recipient getting / reading it
 * (rejected by the first per-recipient error).
 */
export class SentMessage {
  constructor(to, data, mode) {
    /** @type {string[]} the recipients */
    this.to = to;
    this.data = data;
    /** @type {"fast" | "reliable"} */
    this.mode = mode;
    /** @type {string | null} the daemon's id, known from `stored` or the first receipt */
    this.id = null;
    /** @type {Map<string, Set<string>>} recipient -> regions where it was delivered */
    this.deliveredTo = new Map();
    /** @type {Set<string>} recipients who read it */
    this.readBy = new Set();
    /** @type {Map<string, PresencedError>} recipient -> why it could not reach them */
    this.errors = new Map();
    this.stored = false;
    this._inFlight = false;
    this._handlers = { delivered: [], read: [], error: [], change: [] };
    this._accepted = deferred();
    this._delivered = deferred();
    this._read = deferred();
    /** Resolves when every recipient has it. @type {Promise<void>} */
    this.delivered = this._delivered.promise;
    /** Resolves when every recipient has read it. @type {Promise<void>} */
    this.read = this._read.promise;
  }

  /** Resolves with the id when the daemon accepted the message. */
  then(onFulfilled, onRejected) {
    return this._accepted.promise.then(onFulfilled, onRejected);
  }

  catch(onRejected) {
    return this._accepted.promise.catch(onRejected);
  }

  finally(onFinally) {
    return this._accepted.promise.finally(onFinally);
  }

  /**
   * Listen to receipts: "delivered" ({to, region}), "read" ({by}), "error" (a
   * PresencedError; `.frame.to` is the recipient) or "change" (this object).
   * @returns {() => void} unsubscribe
   */
  on(event, callback) {
    const list = this._handlers[event];
    if (!list) throw new Error(`unknown SentMessage event ${event}`);
    list.push(callback);
    return () => list.splice(list.indexOf(callback) >>> 0, 1);
  }

  /** What became of the message for `user` (default: the first recipient). */
  status(user = this.to[0]) {
    if (this.errors.has(user)) return "failed";
    if (this.readBy.has(user)) return "read";
    if (this.deliveredTo.has(user)) return "delivered";
    return this.stored ? "stored" : "sending";
  }

  _emit(event, value) {
    for (const callback of [...this._handlers[event]]) {
      try {
        callback(value);
      } catch (exc) {
        console.error(exc);
      }
    }
    if (event !== "change") this._emit("change", this);
  }

  _settle() {
    const failed = this.to.filter((u) => this.errors.has(u));
    if (failed.length) {
      const error = this.errors.get(failed[0]);
      this._delivered.reject(error);
      this._read.reject(error);
      if (failed.length === this.to.length) this._accepted.reject(error);
    }
    if (this.to.every((u) => this.deliveredTo.has(u))) this._delivered.resolve();
    if (this.to.every((u) => this.readBy.has(u))) this._read.resolve();
  }

  _onFrame(frame) {
    this.id = this.id || frame.id || null;
    switch (frame.type) {
      case "stored":
        this.stored = true;
        this._accepted.resolve(this.id);
        this._emit("change", this);
        break;
      case "delivered": {
        const regions = this.deliveredTo.get(frame.to) || new Set();
        regions.add(frame.region);
        this.deliveredTo.set(frame.to, regions);
        this._accepted.resolve(this.id);
        this._emit("delivered", { to: frame.to, region: frame.region });
        break;
      }
      case "read":
        this.readBy.add(frame.by);
        this._emit("read", { by: frame.by });
        break;
      case "error": {
        const error = errorFrom(frame);
        if (frame.to === undefined) {
          // The whole request was refused (bad_request, store_full, ...).
          for (const user of this.to) this.errors.set(user, error);
          this._accepted.reject(error);
        } else {
          this.errors.set(frame.to, error);
        }
        this._emit("error", error);
        break;
      }
      default:
        return;
    }
    this._settle();
  }

  _lost(error) {
    // The connection went before the daemon accepted it: it may or may not have been sent.
    this._accepted.reject(error);
  }
}

// ------------------------------------------------------------------------- the client

/**
 * Connect to a presenced daemon. Returns at once; the client connects, says hello, and
 * reconnects by itself until `close()`. Calls made before the connection is up wait for it.
 *
 * @param {string} url the daemon's `ws://` or `wss://` URL
 * @param {Object} [options]
 * @param {string} [options.user] user id for an anonymous connection (daemons with
 *   `--allow-anonymous` only)
 * @param {string} [options.token] a JWT (see docs/protocol.md, *Tokens*)
 * @param {() => (string | Promise<string>)} [options.getToken] gives a fresh JWT: called for
 *   every hello (taking the place of `token`) and, while the session's token expires, before
 *   it does (sent in a `refresh`); a session closed for an expired token (4003) reconnects
 * @param {string} [options.client] free text for the daemon's logs
 * @param {number} [options.backoffBase] first reconnect delay ceiling, ms (250)
 * @param {number} [options.backoffMax] largest reconnect delay, ms (10000)
 * @param {typeof WebSocket} [options.WebSocket] the WebSocket class (default: the global one)
 * @returns {PresenceClient}
 */
export function connect(url, options = {}) {
  return new PresenceClient(url, options);
}

/** A connection to a daemon. Make one with {@link connect}. */
export class PresenceClient {
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this._WebSocket) throw new Error("no WebSocket class: pass options.WebSocket");
    /** The daemon's `welcome` frame (session, user, region, tick_ms, limits). */
    this.welcome = null;
    /** The `resume` token of the last `welcome`, offered in the next `hello`. */
    this._resume = null;
    /** The socket whose `welcome` was taken in. */
    this._welcomedOn = null;
    /** Rooms left while disconnected that a resumed session may still be in. */
    this._leftWhileDown = new Set();
    /** @type {"connecting" | "connected" | "reconnecting" | "closed"} */
    this.status = "connecting";
    this._ws = null;
    this._ref = 0;
    this._attempt = 0;
    this._timer = null;
    this._closed = false;
    /** Why the daemon refused us for good (unauthorized), if it did. */
    this._fatal = null;
    /** The pending token refresh (with `getToken`), and how many were answered. */
    this._refreshTimer = null;
    this.refreshes = 0;
    /** ref -> {resolve, reject} of requests waiting for a reply */
    this._requests = new Map();
    /**
     * room -> {meta, presences, active, joined, resuming, ref, waiters, patch, timer, lastSent,
     * outbox}. `joined`: the daemon confirmed the join for the current session (it stays true
     * across a drop, for a resume); `resuming`: resumed, waiting for the room's `state`.
     */
    this._rooms = new Map();
    /** Frames (not tied to a room) waiting for the connection. */
    this._outbox = [];
    /** Watched rooms (count-only) -> {counts: {sessions, users} | null, onCount}. */
    this._watches = new Map();
    /** ref / id -> SentMessage */
    this._sentByRef = new Map();
    this._sentById = new Map();
    this._seen = new Map();
    this._handlers = {
      state: [],
      diff: [],
      join: [],
      leave: [],
      broadcast: [],
      message: [],
      status: [],
      error: [],
    };
    this._welcomed = deferred();
    this._open();
  }

  /** The daemon's tick in ms (from `welcome`): the least useful gap between updates. */
  get tickMs() {
    return (this.welcome && this.welcome.tick_ms) || 30;
  }

  /** This session's id: kept by a resumed reconnect, new after any other reconnect. */
  get session() {
    return this.welcome ? this.welcome.session : null;
  }

  /** Resolves with the `welcome` frame once connected and greeted. */
  get ready() {
    return this._welcomed.promise;
  }

  // ----------------------------------------------------------------- callbacks

  _on(kind, callback) {
    this._handlers[kind].push(callback);
    return () => {
      const at = this._handlers[kind].indexOf(callback);
      if (at >= 0) this._handlers[kind].splice(at, 1);
    };
  }

  _emit(kind, ...args) {
    for (const callback of [...this._handlers[kind]]) {
      try {
        callback(...args);
      } catch (exc) {
        console.error(exc);
      }
    }
  }

  /**
   * A room's map was replaced by a full state (joined, resynced, or rejoined).
   * @param {(room: string, presences: Presences) => void} callback
   * @returns {() => void} unsubscribe (so for every `on*` method)
   */
  onState(callback) {
    return this._on("state", callback);
  }

  /** A diff was applied to a room's map. @param {(room: string, diff: Diff, presences: Presences) => void} callback */
  onDiff(callback) {
    return this._on("diff", callback);
  }

  /** Sessions were added to a room. @param {(room: string, user: string, current: Session[], joined: Session[]) => void} callback */
  onJoin(callback) {
    return this._on("join", callback);
  }

  /** Sessions left a room. @param {(room: string, user: string, remaining: Session[], left: Session[]) => void} callback */
  onLeave(callback) {
    return this._on("leave", callback);
  }

  /** A room broadcast arrived. @param {(room: string, event: string, data: any, from: {user: string, session: string, region: string}) => void} callback */
  onBroadcast(callback) {
    return this._on("broadcast", callback);
  }

  /**
   * A direct message arrived (each `id` once, even if the daemons retransmit it).
   * @param {(message: {id: string, from: string, session: string, region: string, to?: string[], data: any, mode: string, sent_at: number}) => void} callback
   */
  onMessage(callback) {
    return this._on("message", callback);
  }

  /**
   * The connection status changed: "connected" (with the `welcome`, and `resumed`: whether the
   * session was resumed), "reconnecting" (with the delay before the next attempt, ms) or
   * "closed" (for good: `close()`, or the daemon refused us).
   * @param {(status: string, detail: Object) => void} callback
   */
  onStatus(callback) {
    return this._on("status", callback);
  }

  /** An error frame that answers no request of ours (`rate_limited`, ...). @param {(error: PresencedError) => void} callback */
  onError(callback) {
    return this._on("error", callback);
  }

  // ----------------------------------------------------------------- rooms

  /**
   * Join a room (again: replaces the meta). Resolves with the room's presence map from the
   * daemon's `state` (which includes this session once the daemon counts it). While
   * disconnected, the join is sent when the connection is back.
   * @param {string} room
   * @param {Object<string, any>} [meta]
   * @returns {Promise<Presences>}
   */
  join(room, meta = {}) {
    if (this._closed) return Promise.reject(new PresencedError("closed", "client closed"));
    let entry = this._rooms.get(room);
    if (!entry) {
      entry = {
        meta: {},
        presences: {},
        active: false,
        joined: false,
        resuming: false,
        ref: null,
        waiters: [],
        patch: null,
        timer: null,
        lastSent: -Infinity,
        outbox: [],
      };
      this._rooms.set(room, entry);
    }
    entry.meta = { ...meta };
    entry.patch = null; // the join carries the whole meta
    this._leftWhileDown.delete(room);
    this._watches.delete(room); // a join replaces a watch (the daemon's rule too)
    const done = new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
    if (this.status === "connected") this._sendJoin(room, entry);
    return done;
  }

  /**
   * Patch this session's meta in a room: keys are set, a null value removes the key.
   * Throttled to one frame per tick per room: patches are merged, the first goes at once,
   * later ones within the tick go together at its end (the last patch is always sent).
   * @param {string} room
   * @param {Object<string, any>} patch
   */
  update(room, patch) {
    const entry = this._rooms.get(room);
    if (!entry) throw new PresencedError("not_joined", `not in room ${JSON.stringify(room)}`);
    entry.meta = applyPatch(entry.meta, patch);
    entry.patch = { ...(entry.patch || {}), ...patch };
    if (!entry.active || this.status !== "connected") return; // the (re)join will carry it
    if (entry.timer !== null) return; // the trailing edge will carry it
    const wait = entry.lastSent + this.tickMs - now();
    if (wait <= 0) this._flushUpdate(room, entry);
    else entry.timer = setTimeout(() => this._flushUpdate(room, entry), wait);
  }

  _flushUpdate(room, entry) {
    if (entry.timer !== null) clearTimeout(entry.timer);
    entry.timer = null;
    if (!entry.patch || !entry.active || this.status !== "connected") return;
    this._send({ type: "update", room, meta: entry.patch });
    entry.patch = null;
    entry.lastSent = now();
  }

  /**
   * Leave a room. Resolves when the daemon confirms (at once if not connected).
   * @param {string} room
   * @returns {Promise<void>}
   */
  async leave(room) {
    if (this._watches.delete(room)) {
      if (this.status === "connected") await this._request({ type: "leave", room }).catch(() => {});
      return;
    }
    const entry = this._rooms.get(room);
    if (!entry) return;
    this._rooms.delete(room);
    if (entry.timer !== null) clearTimeout(entry.timer);
    const error = new PresencedError("left", `left room ${JSON.stringify(room)}`);
    for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
    const mayBeIn = entry.ref !== null || entry.joined;
    if (!mayBeIn) return;
    if (this.status !== "connected") {
      this._leftWhileDown.add(room); // a resume would find the session still in it
      return;
    }
    try {
      await this._request({ type: "leave", room });
    } catch (exc) {
      if (exc instanceof PresencedError && exc.code === "closed") {
        if (!this._rooms.has(room)) this._leftWhileDown.add(room);
      } else if (!(exc instanceof PresencedError && exc.code === "not_joined")) {
        throw exc;
      }
    }
  }

  /**
   * The room's presence map as this client knows it: user -> sessions. Treat it as read-only;
   * it is replaced (not mutated) on each change.
   * @param {string} room
   * @returns {Presences}
   */
  presences(room) {
    const entry = this._rooms.get(room);
    return entry ? entry.presences : {};
  }

  /**
   * Watch a room's counts without being in it (a count-only join: nobody sees this session
   * there). `onCount({sessions, users}, room)` is called with every region's counts now and
   * when they change (at most once per tick). Watched again after any reconnect; `leave(room)`
   * ends it. Watch rooms this client has not joined (a member that watches leaves the room).
   * @param {string} room
   * @param {(counts: {sessions: number, users: number}, room: string) => void} onCount
   */
  watch(room, onCount) {
    this._watches.set(room, { counts: null, onCount });
    if (this.status === "connected") this._send({ type: "join", room, view: "count" });
  }

  /** The latest counts of a watched room, or null. @param {string} room */
  occupancy(room) {
    return this._watches.get(room)?.counts ?? null;
  }

  /** The rooms this client is in (or joining). @returns {string[]} */
  rooms() {
    return [...this._rooms.keys()];
  }

  /**
   * Send an event to every member of a room, in every region (itself too with `echo`).
   * Queued while disconnected or joining.
   * @param {string} room
   * @param {string} event
   * @param {any} [data]
   * @param {{echo?: boolean}} [options]
   */
  broadcast(room, event, data = null, { echo = false } = {}) {
    const entry = this._rooms.get(room);
    if (!entry) throw new PresencedError("not_joined", `not in room ${JSON.stringify(room)}`);
    const frame = { type: "broadcast", room, event, data, echo };
    if (entry.active && this.status === "connected") this._send(frame);
    else entry.outbox.push(frame);
  }

  // ----------------------------------------------------------------- direct messages

  /**
   * Send a direct message to a user, or a group (a list of users).
   * @param {string | string[]} to
   * @param {any} data
   * @param {{mode?: "fast" | "reliable"}} [options] fast (default): memory only, fails if the
   *   recipient is not online; reliable: stored by the daemon until delivered
   * @returns {SentMessage} awaitable (the id, once accepted); see {@link SentMessage}
   */
  send(to, data, { mode = "fast" } = {}) {
    const recipients = typeof to === "string" ? [to] : [...to];
    const sent = new SentMessage(recipients, data, mode);
    const ref = this._nextRef();
    this._sentByRef.set(ref, sent);
    sent.on("change", () => {
      if (sent.id && !this._sentById.has(sent.id)) {
        this._sentById.set(sent.id, sent);
        trim(this._sentById, SEEN_IDS);
      }
    });
    trim(this._sentByRef, SEEN_IDS);
    this._sendOrQueue(
      { type: "send", ref, to, data, mode },
      (error) => sent._lost(error),
      () => (sent._inFlight = true)
    );
    return sent;
  }

  /**
   * Tell the sender of a message this client received that it was read.
   * @param {string} id the message's id
   */
  markRead(id) {
    this._sendOrQueue({ type: "read", id });
  }

  /**
   * Pull pending reliable messages now (they arrive through `onMessage` first).
   * `complete` is false when some daemon that may hold messages could not be asked yet:
   * fetch again after `retryAfterMs`. A fetch that found nothing and could not ask everyone
   * rejects with code `unavailable` instead of resolving to an empty answer.
   * @param {number} [limit] 1..500
   * @returns {Promise<{count: number, remaining: number, complete: boolean, retryAfterMs?: number}>}
   */
  async fetch(limit = 100) {
    await this.ready;
    const reply = await this._request({ type: "fetch", limit });
    const answer = { count: reply.count, remaining: reply.remaining, complete: reply.complete !== false };
    if (reply.retry_after_ms !== undefined) answer.retryAfterMs = reply.retry_after_ms;
    return answer;
  }

  // ----------------------------------------------------------------- misc

  /**
   * Measure the round trip to the daemon. Rejects (code `closed`) when not connected.
   * @returns {Promise<number>} milliseconds
   */
  async ping() {
    if (this.status !== "connected") throw new PresencedError("closed", "not connected");
    const started = now();
    await this._request({ type: "ping", t: Date.now() });
    return now() - started;
  }

  /** Close for good: no more reconnecting. Pending requests reject with code `closed`. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    clearTimeout(this._refreshTimer);
    for (const entry of this._rooms.values()) {
      if (entry.timer !== null) clearTimeout(entry.timer);
      entry.timer = null;
    }
    if (this._ws) this._ws.close(1000, "bye");
    const error = new PresencedError("closed", "client closed");
    this._lose(error);
    for (const entry of this._rooms.values()) {
      for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
    }
    for (const [, fail] of this._outbox.splice(0)) if (fail) fail(error);
    this._setStatus("closed", { reason: "client closed" });
    this._welcomed.reject(error);
  }

  // ----------------------------------------------------------------- connection

  _nextRef() {
    this._ref += 1;
    return this._ref;
  }

  _setStatus(status, detail = {}) {
    if (this.status === status && status !== "reconnecting") return;
    this.status = status;
    this._emit("status", status, detail);
  }

  _open() {
    if (this._closed) return;
    let ws;
    try {
      ws = new this._WebSocket(this.url, SUBPROTOCOL);
    } catch (exc) {
      this._scheduleReconnect({ reason: String(exc) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._greet(ws);
    ws.onmessage = (event) => {
      if (ws !== this._ws) return;
      let frame;
      try {
        frame = JSON.parse(typeof event.data === "string" ? event.data : String(event.data));
      } catch {
        return;
      }
      this._onFrame(frame);
    };
    ws.onclose = (event) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onClose(event);
    };
    ws.onerror = () => {}; // a close event follows
  }

  /** Say hello on a new socket, with a token from `getToken` when there is one. */
  async _greet(ws) {
    let token = this.options.token;
    if (this.options.getToken) {
      try {
        token = await this.options.getToken();
      } catch (exc) {
        // No token now: drop this socket, the reconnect asks again after its backoff.
        if (ws === this._ws) ws.close(1000, "no token");
        this._emit("error", new PresencedError("token", `getToken failed: ${exc}`));
        return;
      }
      if (ws !== this._ws) return;
    }
    const hello = { type: "hello", v: 1, client: this.options.client || "presenced.js" };
    if (token) hello.token = token;
    if (this.options.user) hello.user = this.options.user;
    if (this._resume) hello.resume = this._resume;
    this._request(hello, ws).then(
      (welcome) => this._onWelcome(ws, welcome),
      (error) => {
        if (error.code === "unauthorized") this._fatal = error;
      }
    );
  }

  /**
   * Refresh the session's token before it expires (`expiresInMs` left, as the daemon reckons
   * it: the device's clock does not matter), at 80 % of that, with a token from `getToken`.
   * A refused refresh stops here: the daemon closes the session once the token expires
   * (4003), and the reconnect says hello with a fresh token.
   */
  _scheduleRefresh(expiresInMs) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this.options.getToken || typeof expiresInMs !== "number" || this._closed) return;
    this._refreshTimer = setTimeout(async () => {
      this._refreshTimer = null;
      const ws = this._ws;
      try {
        const token = await this.options.getToken();
        if (ws !== this._ws) return;
        const reply = await this._request({ type: "refresh", token }, ws);
        this.refreshes += 1;
        this._scheduleRefresh(reply.expires_in_ms);
      } catch (error) {
        const failed =
          error instanceof PresencedError ? error : new PresencedError("token", String(error));
        if (ws === this._ws) this._emit("error", failed);
      }
    }, expiresInMs * 0.8);
  }

  /**
   * Taken in as the `welcome` frame is read, before the frames after it (a resumed room's
   * `state` comes right after: it must find the room waiting for it), then again (a no-op)
   * when the hello's promise resolves.
   */
  _onWelcome(ws, welcome) {
    if (ws !== this._ws || this._welcomedOn === ws) return;
    this._welcomedOn = ws;
    const before = this.welcome;
    // Trust `resumed` only for the session we asked for (a daemon must keep the id anyway).
    const resumed =
      welcome.resumed === true &&
      this._resume !== null &&
      before !== null &&
      welcome.session === before.session;
    this.welcome = welcome;
    const token = welcome.resume;
    this._resume =
      typeof token === "string" && token && token.length <= MAX_RESUME_TOKEN ? token : null;
    this._attempt = 0;
    this._scheduleRefresh(welcome.expires_in_ms);
    this._setStatus("connected", { welcome, resumed });
    this._welcomed.resolve(welcome);
    if (resumed) this._resumeRooms(ws);
    else {
      for (const [room, entry] of this._rooms) {
        entry.joined = false;
        entry.resuming = false;
        this._sendJoin(room, entry);
      }
    }
    this._leftWhileDown.clear();
    for (const room of this._watches.keys()) this._send({ type: "join", room, view: "count" }, ws);
    for (const [frame, fail, onSent] of this._outbox.splice(0)) {
      if (this._send(frame, ws)) {
        if (onSent) onSent();
      } else {
        this._outbox.push([frame, fail, onSent]);
      }
    }
  }

  /**
   * The daemon gave the session back: it is still in every room it had joined, and a `state`
   * (no ref) of each follows. Those rooms wait for it (see `_onState`); rooms whose join was
   * not confirmed, or that the app joined again while disconnected, are joined now; rooms the
   * app left meanwhile are left. A ping's answer, which the daemon sends after those states,
   * ends the wait: a room still without its state is not the session's any more (joined anew).
   */
  _resumeRooms(ws) {
    for (const room of this._leftWhileDown) {
      if (!this._rooms.has(room)) quiet(this._request({ type: "leave", room }, ws));
    }
    for (const [room, entry] of this._rooms) {
      if (entry.joined && !entry.waiters.length) entry.resuming = true;
      else this._sendJoin(room, entry);
    }
    if (![...this._rooms.values()].some((entry) => entry.resuming)) return;
    quiet(
      this._request({ type: "ping", t: Date.now() }, ws).then(() => {
        if (ws !== this._ws) return;
        for (const [room, entry] of this._rooms) {
          if (!entry.resuming) continue;
          entry.resuming = false;
          entry.joined = false;
          this._sendJoin(room, entry);
        }
      })
    );
  }

  _onClose(event) {
    const lost = new PresencedError("closed", `connection closed (${event.code || "?"})`);
    this._lose(lost);
    if (this._closed) return;
    if (this._fatal || FATAL_CLOSE_CODES.has(event.code)) {
      const reason = this._fatal ? this._fatal.message : `closed by the daemon (${event.code})`;
      this._closed = true;
      const error = this._fatal || new PresencedError("closed", reason);
      for (const entry of this._rooms.values()) {
        for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
      }
      for (const [, fail] of this._outbox.splice(0)) if (fail) fail(error);
      this._setStatus("closed", { reason, code: event.code });
      this._welcomed.reject(error);
      return;
    }
    this._scheduleReconnect({ code: event.code, reason: event.reason });
  }

  /** The connection is gone: fail what waits for replies, keep what can be redone. */
  _lose(error) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (this.status === "connected") this._welcomed = deferred();
    for (const { reject } of this._requests.values()) reject(error);
    this._requests.clear();
    for (const sent of this._sentByRef.values()) {
      if (sent._inFlight && sent.id === null) sent._lost(error);
    }
    for (const entry of this._rooms.values()) {
      entry.active = false;
      entry.resuming = false;
      entry.ref = null;
      if (entry.timer !== null) clearTimeout(entry.timer);
      entry.timer = null;
    }
  }

  _scheduleReconnect(detail) {
    const delay = backoff(this._attempt, {
      base: this.options.backoffBase ?? 250,
      max: this.options.backoffMax ?? 10000,
    });
    this._attempt += 1;
    this._setStatus("reconnecting", { ...detail, delay, attempt: this._attempt });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _send(frame, ws = this._ws) {
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _sendOrQueue(frame, fail, onSent) {
    if (this._closed) {
      if (fail) fail(new PresencedError("closed", "client closed"));
      return;
    }
    if (this.status === "connected" && this._send(frame)) {
      if (onSent) onSent();
      return;
    }
    this._outbox.push([frame, fail, onSent]);
  }

  _request(frame, ws = this._ws) {
    const ref = this._nextRef();
    return new Promise((resolve, reject) => {
      this._requests.set(ref, { resolve, reject });
      if (!this._send({ ...frame, ref }, ws)) {
        this._requests.delete(ref);
        reject(new PresencedError("closed", "not connected"));
      }
    });
  }

  _sendJoin(room, entry) {
    entry.ref = this._nextRef();
    entry.active = false;
    entry.patch = null; // the join carries the whole meta
    this._send({ type: "join", room, meta: entry.meta, ref: entry.ref });
  }

  _roomByRef(ref) {
    if (ref === undefined || ref === null) return null;
    for (const [room, entry] of this._rooms) if (entry.ref === ref) return [room, entry];
    return null;
  }

  // ----------------------------------------------------------------- receiving

  _onFrame(frame) {
    const ref = frame.ref;
    switch (frame.type) {
      case "welcome":
        if (ref !== undefined && this._requests.has(ref)) this._onWelcome(this._ws, frame);
        break;
      case "state":
        this._onState(frame);
        return;
      case "diff":
        this._onDiff(frame);
        return;
      case "occupancy": {
        const watch = this._watches.get(frame.room);
        if (!watch) return; // left meanwhile
        watch.counts = { sessions: frame.sessions, users: frame.users };
        watch.onCount(watch.counts, frame.room);
        return;
      }
      case "broadcast":
        this._emit("broadcast", frame.room, frame.event, frame.data, frame.from);
        return;
      case "message":
        if (this._seen.has(frame.id)) return; // shown before: a retransmission
        this._seen.set(frame.id, true);
        trim(this._seen, SEEN_IDS);
        this._emit("message", frame);
        return;
      case "stored":
      case "delivered":
      case "read": {
        const sent = this._sentFor(frame);
        if (sent) sent._onFrame(frame);
        return;
      }
      case "error": {
        const joining = this._roomByRef(ref);
        if (joining) {
          const [room, entry] = joining;
          this._rooms.delete(room);
          const error = errorFrom(frame);
          for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
          this._emit("error", error);
          return;
        }
        const sent = this._sentFor(frame);
        if (sent) {
          sent._onFrame(frame);
          return;
        }
        break;
      }
      default:
        break;
    }
    const waiting = ref !== undefined ? this._requests.get(ref) : undefined;
    if (waiting) {
      this._requests.delete(ref);
      if (frame.type === "error") waiting.reject(errorFrom(frame));
      else waiting.resolve(frame);
    } else if (frame.type === "error") {
      if (frame.code === "unauthorized") this._fatal = errorFrom(frame);
      this._emit("error", errorFrom(frame));
    }
  }

  _sentFor(frame) {
    if (frame.ref !== undefined && this._sentByRef.has(frame.ref)) {
      return this._sentByRef.get(frame.ref);
    }
    return frame.id !== undefined ? this._sentById.get(frame.id) : undefined;
  }

  _onState(frame) {
    const entry = this._rooms.get(frame.room);
    if (!entry) return; // left meanwhile
    // No ref (absent, or null after a resume): a resync or a resumed room's fresh state.
    const reply = frame.ref !== undefined && frame.ref !== null;
    if (reply && frame.ref !== entry.ref) return; // an older join's reply
    const room = frame.room;
    entry.presences = syncState(
      entry.presences,
      frame.presences,
      (user, current, joined) => this._emit("join", room, user, current, joined),
      (user, remaining, left) => this._emit("leave", room, user, remaining, left)
    );
    const resumed = !reply && entry.resuming;
    if (resumed) {
      entry.resuming = false;
      // Bring the daemon's copy of our meta up to date: updates made while disconnected, and
      // any lost in the drop. Without our session in the state, send what was patched offline.
      const self = (frame.presences?.[this.welcome.user] || []).find(
        (s) => s.session === this.welcome.session
      );
      if (self) entry.patch = metaPatch(self.meta, entry.meta);
    }
    const joined = reply || resumed;
    if (joined) {
      entry.active = true;
      entry.joined = true;
      entry.lastSent = -Infinity;
      for (const waiter of entry.waiters.splice(0)) waiter.resolve(entry.presences);
    }
    this._emit("state", room, entry.presences);
    if (joined) {
      for (const queued of entry.outbox.splice(0)) this._send(queued);
      if (entry.patch) this.update(room, {}); // patches made while the join was in flight
    }
  }

  _onDiff(frame) {
    const entry = this._rooms.get(frame.room);
    if (!entry || !entry.active) return; // a diff before our state: the state will cover it
    const room = frame.room;
    entry.presences = syncDiff(
      entry.presences,
      frame,
      (user, current, joined) => this._emit("join", room, user, current, joined),
      (user, remaining, left) => this._emit("leave", room, user, remaining, left)
    );
    this._emit(
      "diff",
      room,
      { joins: frame.joins || {}, leaves: frame.leaves || {}, updates: frame.updates || {} },
      entry.presences
    );
  }
}

function now() {
  return globalThis.performance ? globalThis.performance.now() : Date.now();
}

function trim(map, size) {
  while (map.size > size) map.delete(map.keys().next().value);
}
