'use strict';
// Nimbus Node.js worker: loads one function's handler, then serves invocations.
//
// Started by the Nimbus server as `node <runtime dir>/nimbus_worker.js`, with the function's
// code directory as working directory and the host connection on file descriptor 3. Frames
// are a u32 big-endian length followed by that many bytes of JSON (see the nimbus-runtime
// crate), the same protocol as the Python worker's:
//
//   host -> worker   invoke {id, request_id, event, state, session_key}   ping {id}
//                    state_result {id, ok, value, version | error}
//   worker -> host   ready {pid, runtime, init_ms, logs}  init_error {error, logs}
//                    result {id, ok, body | error, logs, max_rss_kb}   pong {id}
//                    state {id, op, scope, key, value, ttl, delta, version, pattern}
//
// Invocations run one at a time. While a handler runs, each `state` call sends a request
// and its promise settles with the `state_result` of the same id.
//
// Environment: NIMBUS_HANDLER=module.function (`index.handle` loads ./index.js, ./index.mjs
// or ./index.cjs; dotted module paths are directories), plus the function's own variables.
// The worker exits 0 when the host closes the connection, 1 when the handler cannot be
// loaded.

const started = process.hrtime.bigint();
const net = require('node:net');
const path = require('node:path');
const fs = require('node:fs');
const { pathToFileURL } = require('node:url');

const SOCKET_FD = 3;
// Largest frame the host accepts (MAX_FRAME_BYTES in protocol.rs).
const MAX_FRAME_BYTES = 16 * 1024 * 1024;
// Tail of stdout/stderr kept per invocation, UTF-8 bytes.
const LOG_TAIL_BYTES = 4096;
const MAX_MESSAGE_CHARS = 8192;
const MAX_TRACEBACK_CHARS = 32768;
const DEFAULT_HANDLER = 'index.handle';

// The API of the `nimbus` package, installed at <data dir>/node_modules/nimbus (this file is
// <data dir>/runtime/node/nimbus_worker.js): the same file a function's `require('nimbus')`
// and `import ... from 'nimbus'` reach, so the errors a function catches are the classes the
// state calls here reject with.
const internals = require(path.join(__dirname, '..', '..', 'node_modules', 'nimbus', 'nimbus.js'))[
  Symbol.for('nimbus.worker')
];

// --- logs -----------------------------------------------------------------------------

/** What the function printed since the last `take`, bounded to a tail. */
class Sink {
  constructor() {
    this.parts = [];
    this.size = 0;
  }

  add(text) {
    this.parts.push(text);
    this.size += text.length;
    // Compacted to its tail now and then, so a chatty handler cannot grow it without bound.
    if (this.size > 64 * LOG_TAIL_BYTES) {
      this.parts = [this.take()];
      this.size = this.parts[0].length;
    }
  }

  clear() {
    this.parts = [];
    this.size = 0;
  }

  take() {
    if (this.parts.length === 0) return '';
    const text = this.parts.join('');
    this.clear();
    const bytes = Buffer.from(text, 'utf8');
    if (bytes.length <= LOG_TAIL_BYTES) return text;
    // The tail, cut at a character boundary.
    let start = bytes.length - LOG_TAIL_BYTES;
    while (start < bytes.length && (bytes[start] & 0xc0) === 0x80) start += 1;
    return bytes.subarray(start).toString('utf8');
  }
}

const sink = new Sink();

/** Makes what the function writes to stdout and stderr (console included) a log. */
function capture() {
  for (const stream of [process.stdout, process.stderr]) {
    stream.write = (chunk, encoding, callback) => {
      sink.add(typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8'));
      const done = typeof encoding === 'function' ? encoding : callback;
      if (typeof done === 'function') process.nextTick(done);
      return true;
    };
  }
}

// --- errors -----------------------------------------------------------------------------

function clean(text, limit) {
  text = String(text);
  return text.length > limit ? text.slice(0, limit) + '…' : text;
}

// Host paths errors must not show (see sandboxPaths): the function's code directory (the
// working directory the worker starts in), as a path and as the file URL of an ES module, and
// the data directory holding it and the runtime (this file is <data dir>/runtime/node/...).
const CODE_DIR = process.cwd();
// Characters of file names besides letters and digits: one of them next to a path means a
// longer name (`/data` in `/database`, `/data-old`, `/mnt/data`), not that path.
const NAME = String.raw`\p{L}\p{N}_\-~+@%=#$.`;
// A hidden path where it is whole: no name character before it; after it a `/` (replaced
// along with it), the end of the text, a character no name has, or a `.` that ends a
// sentence (not `.bak`).
const wholePath = (hidden) =>
  new RegExp(
    `(?<![${NAME}])${hidden.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}` +
      String.raw`(?:(/)|(?=$|\.(?:$|[^${NAME}/])|[^${NAME}/]))`,
    'gu',
  );
const HIDDEN_PATHS = [
  [pathToFileURL(CODE_DIR).href, '.'],
  [CODE_DIR, '.'],
  [path.join(__dirname, '..', '..'), '<nimbus>'],
]
  .filter(([hidden]) => hidden !== '/' && hidden !== 'file:///')
  .map(([hidden, shown]) => [hidden, wholePath(hidden), shown]);

/**
 * `text` without the host paths of the data directory: a path in the function's code as the
 * function knows it, relative to its working directory (`lib/util.js`), and any other path of
 * the data directory (the runtime's files) under `<nimbus>`. Only whole paths are replaced:
 * `/data/x` and `/data` with a data directory `/data`, not `/database` nor `/mnt/data`.
 */
function sandboxPaths(text) {
  for (const [hidden, pattern, shown] of HIDDEN_PATHS) {
    if (text.includes(hidden)) {
      text = text.replace(pattern, (_, slash) => {
        if (!slash) return shown;
        return shown === '.' ? '' : shown + '/';
      });
    }
  }
  return text;
}

/** An error (or anything thrown) as the protocol's `{type, message, traceback}`, no host paths. */
function describe(error, message) {
  if (error instanceof Error) {
    return {
      type: error.name || error.constructor?.name || 'Error',
      message: clean(sandboxPaths(String(message ?? error.message)), MAX_MESSAGE_CHARS),
      traceback: clean(sandboxPaths(String(error.stack || '')), MAX_TRACEBACK_CHARS),
    };
  }
  return {
    type: 'Error',
    message: clean(
      sandboxPaths(String(message ?? `a non-Error value was thrown: ${safeString(error)}`)),
      MAX_MESSAGE_CHARS,
    ),
    traceback: '',
  };
}

function safeString(value) {
  try {
    return typeof value === 'string' ? value : JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

// --- the host connection ------------------------------------------------------------------

class Host {
  constructor(socket) {
    this.socket = socket;
    this.buffer = Buffer.alloc(0);
    this.waiting = [];
    this.frames = [];
    this.closed = false;
    socket.on('data', (chunk) => this.received(chunk));
    socket.on('end', () => this.close());
    socket.on('close', () => this.close());
    socket.on('error', () => this.close());
  }

  received(chunk) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, chunk]) : chunk;
    while (this.buffer.length >= 4) {
      const size = this.buffer.readUInt32BE(0);
      if (size > MAX_FRAME_BYTES) {
        fail(`nimbus_worker: frame of ${size} bytes from the host exceeds the limit`, 2);
      }
      if (this.buffer.length < 4 + size) break;
      const text = this.buffer.subarray(4, 4 + size).toString('utf8');
      this.buffer = this.buffer.subarray(4 + size);
      this.deliver(text);
    }
  }

  deliver(text) {
    // Answers to state calls settle the handler's promises at once: the serve loop is
    // waiting for the handler then, not reading.
    if (text.startsWith('{"type":"state_result"')) {
      this.onStateResult?.(JSON.parse(text));
      return;
    }
    const next = this.waiting.shift();
    if (next) next(text);
    else this.frames.push(text);
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    for (const next of this.waiting.splice(0)) next(null);
  }

  /** The next frame's text, or null at end of stream. */
  read() {
    if (this.frames.length) return Promise.resolve(this.frames.shift());
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  send(message) {
    this.sendText(JSON.stringify(message));
  }

  sendText(text) {
    // One buffer, one write: the length, then the text.
    const size = Buffer.byteLength(text, 'utf8');
    const frame = Buffer.allocUnsafe(4 + size);
    frame.writeUInt32BE(size, 0);
    frame.write(text, 4, 'utf8');
    this.socket.write(frame);
  }
}

function fail(message, code) {
  fs.writeSync(2, message + '\n');
  process.exit(code);
}

// --- loading the handler ------------------------------------------------------------------

class InitFailure extends Error {
  constructor(payload) {
    super(payload.message);
    this.payload = payload;
  }
}

/** The module file of `spec`'s module in the code directory: .js, .mjs or .cjs. */
function moduleFile(modulePath) {
  const base = path.join(process.cwd(), ...modulePath.split('.'));
  for (const ext of ['.js', '.mjs', '.cjs']) {
    if (fs.existsSync(base + ext)) return base + ext;
  }
  throw new InitFailure({
    type: 'HandlerNotFound',
    message: `module ${modulePath} not found: none of ${modulePath.split('.').join('/')}.js, .mjs or .cjs is in the code`,
    traceback: '',
  });
}

async function load(spec) {
  const dot = spec.lastIndexOf('.');
  if (dot <= 0 || dot === spec.length - 1) {
    throw new InitFailure({
      type: 'InvalidHandler',
      message: `NIMBUS_HANDLER ${JSON.stringify(spec)} is not module.function`,
      traceback: '',
    });
  }
  const modulePath = spec.slice(0, dot);
  const name = spec.slice(dot + 1);
  const file = moduleFile(modulePath);
  let exported;
  if (file.endsWith('.mjs')) {
    exported = await import(pathToFileURL(file).href);
  } else {
    try {
      exported = require(file);
    } catch (error) {
      // A .js file of a `"type": "module"` package is an ES module: Node 20 before 20.19
      // refuses to require it, later ones require it unless it awaits at top level (and
      // then refuse before running any of it).
      if (error && (error.code === 'ERR_REQUIRE_ESM' || error.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
        exported = await import(pathToFileURL(file).href);
      } else {
        throw error;
      }
    }
  }
  let handler = exported?.[name];
  if (handler === undefined && exported?.default && typeof exported.default === 'object') {
    handler = exported.default[name];
  }
  if (typeof handler !== 'function') {
    throw new InitFailure({
      type: 'HandlerNotFound',
      message: `${path.relative(process.cwd(), file)} has no exported function ${JSON.stringify(name)}` +
        (handler === undefined ? '' : ` (it exports a ${typeof handler})`),
      traceback: '',
    });
  }
  return handler;
}

// --- serving ------------------------------------------------------------------------------

function maxRssKb() {
  return Math.round(process.resourceUsage().maxRSS);
}

/** The result frame of a handler's return value (undefined reads as null). */
function resultText(id, value) {
  const out = { type: 'result', id, ok: true, body: value === undefined ? null : value };
  let text;
  try {
    out.logs = sink.take();
    out.max_rss_kb = maxRssKb();
    text = JSON.stringify(out);
  } catch (error) {
    return errorText(id, {
      type: 'TypeError',
      message: clean(`the handler's return value is not JSON-serializable: ${error.message}`, MAX_MESSAGE_CHARS),
      traceback: '',
    }, out.logs);
  }
  if (Buffer.byteLength(text, 'utf8') > MAX_FRAME_BYTES - 64) {
    return errorText(id, {
      type: 'ResultTooLarge',
      message: `the handler's return value is over the ${MAX_FRAME_BYTES - 64}-byte limit`,
      traceback: '',
    }, out.logs);
  }
  return text;
}

function errorText(id, error, logs) {
  return JSON.stringify({
    type: 'result',
    id,
    ok: false,
    error,
    logs: logs ?? sink.take(),
    max_rss_kb: maxRssKb(),
  });
}

async function serve(host, handler) {
  const states = internals.states(host);
  for (;;) {
    const text = await host.read();
    if (text === null) return;
    let message;
    try {
      message = JSON.parse(text);
    } catch (error) {
      const id = /^\{"type":"invoke","id":(\d+),/.exec(text)?.[1];
      if (id === undefined) fail(`nimbus_worker: invalid frame from the host: ${error.message}`, 2);
      host.sendText(errorText(Number(id), { type: 'InvalidEvent', message: `the event could not be decoded: ${error.message}`, traceback: '' }));
      continue;
    }
    if (message.type === 'invoke') {
      sink.clear(); // anything printed between invocations belongs to none
      internals.requestId = message.request_id ?? null;
      const state = message.state ? states.live : states.disabled;
      states.begin();
      let reply;
      try {
        const value = await handler(message.event, state);
        reply = resultText(message.id, value);
      } catch (error) {
        reply = errorText(message.id, describe(error));
      } finally {
        internals.requestId = null;
        states.done();
      }
      host.sendText(reply);
    } else if (message.type === 'ping') {
      host.send({ type: 'pong', id: message.id });
    }
    // Other messages (from newer hosts) are ignored.
  }
}

async function main() {
  let socket;
  try {
    socket = new net.Socket({ fd: SOCKET_FD, readable: true, writable: true });
  } catch (error) {
    fail(`nimbus_worker: fd ${SOCKET_FD} is not the host socket: ${error.message}`, 2);
  }
  const host = new Host(socket);
  capture();
  const loading = process.hrtime.bigint();
  const spec = (process.env.NIMBUS_HANDLER || '').trim() || DEFAULT_HANDLER;
  let handler;
  try {
    handler = await load(spec);
  } catch (error) {
    const payload = error instanceof InitFailure ? error.payload : describe(error);
    host.send({ type: 'init_error', error: payload, logs: sink.take() });
    socket.end(() => process.exit(1));
    return;
  }
  const now = process.hrtime.bigint();
  host.send({
    type: 'ready',
    pid: process.pid,
    runtime: `nodejs${process.versions.node.split('.')[0]}`,
    init_ms: Number(now - loading) / 1e6,
    start_ms: Number(now - started) / 1e6,
    logs: sink.take(),
  });
  // A promise the handler left rejected is its own business, not the worker's end.
  process.on('unhandledRejection', (reason) => {
    sink.add(`unhandled rejection: ${describe(reason).traceback || safeString(reason)}\n`);
  });
  await serve(host, handler);
  process.exit(0);
}

main();
