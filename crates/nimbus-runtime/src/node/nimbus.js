'use strict';
// Nimbus: the API that Node.js functions running on Nimbus can require or import (the
// package's index.js names what it exports).
//
//   const nimbus = require('nimbus');   // or: import nimbus, { StateConflict } from 'nimbus';
//
//   exports.handle = async (event, state) => {
//     const cart = (await state.get('cart')) ?? [];
//     cart.push(event.item_id);
//     await state.set('cart', cart, 3600);
//     return { cartSize: cart.length, total: await state.incr('item_count') };
//   };
//
// The worker passes `state` as the handler's second argument: the session's state, with
// `state.function()` and `state.invocation()` for the other scopes. Every call returns a
// promise; failures reject with the errors below, as in the Python runtime.

/** A state operation failed; `code` is the platform's stable error code. */
class StateError extends Error {
  constructor(message, code) {
    super(message);
    this.name = new.target.name;
    this.code = code ?? new.target.code ?? 'state_error';
  }
}

/** The function used `state`, but its state is not enabled. */
class StateNotEnabled extends StateError {}
StateNotEnabled.code = 'state_not_enabled';

/** `setWithVersion` held a stale version; `currentVersion` is the key's now (0: absent). */
class StateConflict extends StateError {
  constructor(message, currentVersion) {
    super(message, 'state_conflict');
    this.currentVersion = currentVersion ?? 0;
  }
}
StateConflict.code = 'state_conflict';

/** The value is larger than the function's max_state_size. Nothing was written. */
class StateValueTooLarge extends StateError {}
StateValueTooLarge.code = 'value_too_large';

/** Writing a new key would pass the function's max_keys. Nothing was written. */
class StateTooManyKeys extends StateError {}
StateTooManyKeys.code = 'too_many_keys';

/** The key is longer than 256 bytes. Nothing was written. */
class StateKeyTooLong extends StateError {}
StateKeyTooLong.code = 'key_too_long';

/** The state store cannot be reached right now; a write may or may not have been applied. */
class StateUnavailable extends StateError {}
StateUnavailable.code = 'state_unavailable';

const ERRORS = new Map(
  [StateNotEnabled, StateValueTooLarge, StateTooManyKeys, StateKeyTooLong, StateUnavailable].map(
    (cls) => [cls.code, cls],
  ),
);

/** The error a failed operation stands for, as the host reports it. */
function stateError(error) {
  const code = error?.code ?? 'state_error';
  const message = error?.message ?? code;
  if (code === 'state_conflict') return new StateConflict(message, error.current_version);
  const Cls = ERRORS.get(code);
  return Cls ? new Cls(message) : new StateError(message, code);
}

const NOT_ENABLED =
  'state is not enabled for this function (enable it in the function\'s state_config to use the state API)';
const MAX_TTL = 10 * 365 * 24 * 3600;
const FRAME_LIMIT = 16 * 1024 * 1024 - 64;

function checkText(value, what) {
  if (typeof value !== 'string') throw new TypeError(`${what} is a string, not ${typeof value}`);
  if (!value.isWellFormed()) throw new StateError(`${what} ${JSON.stringify(value)} is not valid Unicode text`, 'invalid_key');
  return value;
}

function checkTtl(ttl) {
  if (ttl === undefined || ttl === null) return null;
  if (typeof ttl !== 'number' || !(ttl > 0 && ttl <= MAX_TTL)) {
    throw new RangeError(`ttl is a number of seconds from 0.001 to ${MAX_TTL}, not ${ttl}`);
  }
  return ttl;
}

function checkInteger(value, what) {
  if (!Number.isSafeInteger(value)) throw new TypeError(`${what} is an integer, not ${value}`);
  return value;
}

/** One scope of the function's state. */
class Scope {
  constructor(call, scope) {
    this._call = call;
    this._scope = scope;
  }

  /** The value of `key`, or `fallback` if it is absent (or expired). */
  async get(key, fallback = null) {
    const reply = await this._call({ op: 'get', scope: this._scope, key: checkText(key, 'a state key') });
    return reply.version ? reply.value : fallback;
  }

  /** Stores `value` under `key`, for `ttl` seconds (default: the function's default_ttl). Resolves to the new version. */
  async set(key, value, ttl) {
    const reply = await this._call({ op: 'set', scope: this._scope, key: checkText(key, 'a state key'), value: value ?? null, ttl: checkTtl(ttl) });
    return reply.version;
  }

  /** Removes `key`; whether it was there. */
  async delete(key) {
    return (await this._call({ op: 'delete', scope: this._scope, key: checkText(key, 'a state key') })).value;
  }

  /** Whether `key` holds a value. */
  async exists(key) {
    return (await this._call({ op: 'exists', scope: this._scope, key: checkText(key, 'a state key') })).value;
  }

  /** The keys matching the glob `pattern` (`*`, `?`, `\` escapes), sorted. */
  async keys(pattern = '*') {
    return (await this._call({ op: 'keys', scope: this._scope, pattern: checkText(pattern, 'the pattern') })).value;
  }

  /** Adds `delta` to the integer at `key` (absent: 0) atomically; resolves to the result. */
  async incr(key, delta = 1) {
    const reply = await this._call({ op: 'incr', scope: this._scope, key: checkText(key, 'a state key'), delta: checkInteger(delta, 'delta') });
    return reply.value;
  }

  /** `incr(key, -delta)`. */
  async decr(key, delta = 1) {
    return this.incr(key, -checkInteger(delta, 'delta'));
  }

  /** Lets `key` expire in `ttl` seconds (null: never); whether the key was there. */
  async expire(key, ttl) {
    return (await this._call({ op: 'expire', scope: this._scope, key: checkText(key, 'a state key'), ttl: checkTtl(ttl) })).value;
  }

  /** `{value, version}`; `{value: null, version: 0}` if absent. */
  async getWithVersion(key) {
    const reply = await this._call({ op: 'get_with_version', scope: this._scope, key: checkText(key, 'a state key') });
    const version = reply.version ?? 0;
    return { value: version ? reply.value : null, version };
  }

  /** Stores `value` only if `key` is still at `version` (0: only if absent); rejects with StateConflict otherwise. Resolves to the new version. */
  async setWithVersion(key, value, version, ttl) {
    if (!Number.isSafeInteger(version) || version < 0) {
      throw new TypeError(`version is what getWithVersion returned, not ${version}`);
    }
    const reply = await this._call({ op: 'set_with_version', scope: this._scope, key: checkText(key, 'a state key'), value: value ?? null, version, ttl: checkTtl(ttl) });
    return reply.version;
  }
}

/** The `state` argument: the session's state, with the other scopes a call away. */
class State extends Scope {
  constructor(call) {
    super(call, 'session');
    this._function = new Scope(call, 'function');
    this._invocation = new Scope(call, 'invocation');
  }

  /** This session's state (the same as `state` itself). */
  session() {
    return this;
  }

  /** State shared by every invocation of the function, whatever the session. */
  function() {
    return this._function;
  }

  /** State of this invocation only, gone when it ends. */
  invocation() {
    return this._invocation;
  }
}

/** The `state` of a function whose state is not enabled: every use rejects. */
class DisabledState extends State {
  constructor() {
    super(() => Promise.reject(new StateNotEnabled(NOT_ENABLED)));
  }
}

/**
 * The worker's side of the state API over `host`: the live state handed to handlers, the
 * disabled one, and the hooks the worker calls (answers from the host; the end of an
 * invocation, after which calls of that invocation's handler are refused).
 */
function states(host) {
  let counter = 0;
  let open = false;
  const pending = new Map();
  const call = (request) => {
    if (!open) {
      return Promise.reject(new StateError(
        'state can be used only while the invocation runs (not after the handler returned)',
        'invalid_argument',
      ));
    }
    counter += 1;
    const id = counter;
    let text;
    try {
      text = JSON.stringify({ type: 'state', id, ...request });
    } catch (error) {
      return Promise.reject(new TypeError(`the state value is not JSON-serializable: ${error.message}`));
    }
    if (Buffer.byteLength(text, 'utf8') > FRAME_LIMIT) {
      return Promise.reject(new StateValueTooLarge(`the state value is over the ${FRAME_LIMIT}-byte frame limit`));
    }
    return new Promise((resolve, reject) => {
      pending.set(id, { resolve, reject });
      host.sendText(text);
    });
  };
  host.onStateResult = (message) => {
    const waiter = pending.get(message.id);
    if (!waiter) return;
    pending.delete(message.id);
    if (message.ok) waiter.resolve(message);
    else waiter.reject(stateError(message.error));
  };
  return {
    live: new State(call),
    disabled: new DisabledState(),
    begin() {
      open = true;
    },
    done() {
      open = false;
    },
  };
}

/** What only the worker uses: the request id it serves and its side of the state API. */
const worker = { requestId: null, states };

/** The request id (`inv_...`) of the invocation being served, or null outside one. */
function currentRequestId() {
  return worker.requestId;
}

// The package's index.js exports each of these under the same name.
module.exports = {
  StateError,
  StateNotEnabled,
  StateConflict,
  StateValueTooLarge,
  StateTooManyKeys,
  StateKeyTooLong,
  StateUnavailable,
  currentRequestId,
};

// Under a symbol: neither part of the API nor an importable name.
module.exports[Symbol.for('nimbus.worker')] = worker;
