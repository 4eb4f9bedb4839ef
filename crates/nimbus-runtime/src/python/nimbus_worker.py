"""Nimbus Python worker: loads one function's handler, then serves invocations.

Started by the Nimbus server as `python -I -S -B nimbus_boot.py` (which imports this module,
so that its byte code is cached, and calls `main`; running this file directly works too),
with the function's code directory as working directory and the host connection on file
descriptor 3. Frames are a
u32 big-endian length followed by that many bytes of JSON (see the nimbus-runtime crate):

    host -> worker   invoke {id, request_id, event, state, session_key}   ping {id}
                     state_result {id, ok, value, version | error}
    worker -> host   ready {pid, runtime, init_ms, logs}  init_error {error, logs}
                     result {id, ok, body | error, logs, max_rss_kb}   pong {id}
                     state {id, op, scope, key, value, ttl, delta, version, pattern}

While a handler runs, each call of its `state` sends a `state` request and waits for the
`state_result` with the same id (the host sends nothing else meanwhile).

Environment: NIMBUS_HANDLER=module.function (dotted packages allowed), plus the function's
own variables. The worker exits 0 when the host closes the connection, 1 when the handler
cannot be loaded.

Start-up time and idle memory matter: only C modules are imported here (`_socket` and
`_json` rather than `socket` and `json`, which pull in `re`, `enum`, `selectors`, ...);
`traceback` is imported on the first error only.
"""

from time import perf_counter

_T0 = perf_counter()

import _json
import _socket
import _thread
import gc
import io
import posix
import sys

from resource import RUSAGE_SELF, getrusage

# Tail of stdout/stderr kept per invocation, in UTF-8 bytes.
_LOG_TAIL_BYTES = 4096
# Captured text is compacted to its tail once it grows past this many characters.
_LOG_COMPACT_CHARS = 1 << 16
# Largest frame the host accepts (MAX_FRAME_BYTES in protocol.rs).
_MAX_FRAME_BYTES = 16 * 1024 * 1024
# Error messages and tracebacks are cut to these many characters.
_MAX_MESSAGE_CHARS = 8192
_MAX_TRACEBACK_CHARS = 32768
_SOCKET_FD = 3
_DEFAULT_HANDLER = "handler.handle"

_CO_VARARGS = 0x04
_SELF_FILE = __file__
_RUNTIME_DIR = __file__.rpartition("/")[0] or "."
_API_DIR = _RUNTIME_DIR + "/nimbus/"
# Host paths errors must not show (see _sandbox_paths): the function's code directory (the
# working directory the worker starts in) and the data directory holding it and the runtime
# (`<data dir>/runtime/python`).
_CODE_DIR = posix.getcwd()
# Modules of the runtime itself, which a handler module cannot be named after either.
_RUNTIME_MODULES = (
    "nimbus",
    "nimbus_worker",
    "nimbus_fork",
    "nimbus_entropy",
    "nimbus_boot",
    "__main__",
)
_DATA_DIR = (
    _RUNTIME_DIR[: -len("/runtime/python")] if _RUNTIME_DIR.endswith("/runtime/python") else None
)


# --- logs -------------------------------------------------------------------------------


class _Sink:
    """What the function printed since the last `take`, bounded to a tail."""

    __slots__ = ("parts", "size")

    def __init__(self):
        self.parts = []
        self.size = 0

    def add(self, text):
        self.parts.append(text)
        self.size += len(text)
        if self.size > _LOG_COMPACT_CHARS:
            # A character is at least one byte: the last 4096 characters hold the byte tail.
            tail = "".join(self.parts)[-_LOG_TAIL_BYTES:]
            self.parts[:] = (tail,)
            self.size = len(tail)

    def clear(self):
        if self.parts:
            self.parts.clear()
            self.size = 0

    def take(self):
        """The tail (at most 4096 UTF-8 bytes, cut on a character boundary) and reset."""
        parts = self.parts
        if not parts:
            return ""
        text = "".join(parts)
        parts.clear()
        self.size = 0
        if text.isascii():
            return text[-_LOG_TAIL_BYTES:] if len(text) > _LOG_TAIL_BYTES else text
        data = text.encode("utf-8", "replace")
        if len(data) > _LOG_TAIL_BYTES:
            data = data[-_LOG_TAIL_BYTES:]
        # "ignore" drops only the partial character at the cut.
        return data.decode("utf-8", "ignore")


class _BinaryWriter:
    """`sys.stdout.buffer`: bytes written here are decoded into the logs."""

    __slots__ = ("_sink",)

    def __init__(self, sink):
        self._sink = sink

    def write(self, data):
        self._sink.add(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self):
        pass

    def writable(self):
        return True

    def isatty(self):
        return False


class _Capture(io.TextIOBase):
    """Replaces sys.stdout and sys.stderr for the worker's whole life."""

    encoding = "utf-8"
    errors = "strict"
    newlines = None
    line_buffering = False
    write_through = True
    mode = "w"

    def __init__(self, name, sink):
        super().__init__()
        self.name = name
        self.buffer = _BinaryWriter(sink)
        self._add = sink.add

    def write(self, text):
        if text.__class__ is not str:
            if not isinstance(text, str):
                raise TypeError("write() argument must be str, not " + type(text).__name__)
            text = str(text)
        if text:
            self._add(text)
        return len(text)

    def flush(self):
        pass

    def close(self):
        pass

    def writable(self):
        return True

    def isatty(self):
        return False

    def reconfigure(self, **kwargs):
        pass


# --- JSON (the C accelerators of the json package, without importing it) -------------------


class _DecodeContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float


def _not_serializable(value):
    if hasattr(value, "__await__"):
        raise TypeError(
            "Object of type %s is not JSON serializable (an awaitable: await it, or make "
            "the handler `async def`)" % type(value).__name__
        )
    raise TypeError("Object of type %s is not JSON serializable" % type(value).__name__)


_scan = _json.make_scanner(_DecodeContext())
_markers = {}
# Like json.dumps(..., separators=(",", ":"), allow_nan=False): ASCII output, no NaN.
_encode = _json.make_encoder(
    _markers, _not_serializable, _json.encode_basestring_ascii, None, ":", ",", False, False, False
)


def _clean(text, limit, tail=False):
    """`text` as valid Unicode (no lone surrogates), cut to `limit` characters."""
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        text = ("...\n" + text[-limit:]) if tail else (text[:limit] + "...")
    return text


# --- errors -----------------------------------------------------------------------------


def _user_traceback(tb):
    """`tb` without the frames of the worker, the nimbus package and the import machinery."""
    kept = []
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not (
            name == _SELF_FILE or name.startswith(_API_DIR) or name.startswith("<frozen importlib")
        ):
            kept.append(tb)
        tb = tb.tb_next
    out = None
    for entry in reversed(kept):
        out = type(entry)(out, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return out


def _sandbox_paths(text):
    """`text` without the host paths of the data directory: a path in the function's code
    as the function knows it, relative to its working directory (`lib/util.py`), and any
    other path of the data directory (the runtime's files) under `<nimbus>`. Only whole
    paths are replaced: `/data/x` and `/data` with a data directory `/data`, not `/database`
    nor `/mnt/data`."""
    for path, shown in ((_CODE_DIR, "."), (_DATA_DIR, "<nimbus>")):
        if path and path != "/" and path in text:
            text = _replace_path(text, path, shown)
    return text


# Characters of file names besides letters and digits: one of them next to a path means a
# longer name (`/data` in `/database`, `/data-old`, `/mnt/data`), not that path.
_NAME_CHARS = frozenset("_-~+@%=#$.")


def _is_name_char(char):
    return char.isalnum() or char in _NAME_CHARS


def _ends_path(text, end):
    """Whether a path that stops at `end` in `text` ends there: the text ends, a `/` or a
    character no file name here has follows, or a `.` that ends a sentence (not `.bak`)."""
    after = text[end : end + 1]
    if after == ".":
        after = text[end + 1 : end + 2]
        return not after or (after != "/" and not _is_name_char(after))
    return not after or after == "/" or not _is_name_char(after)


def _replace_path(text, path, shown):
    """`text` with each whole occurrence of the absolute `path` replaced by `shown`, and
    `path/` by `shown/` (by nothing when `shown` is `.`)."""
    out = []
    start = at = 0
    while True:
        at = text.find(path, at)
        if at < 0:
            break
        end = at + len(path)
        if (at > 0 and _is_name_char(text[at - 1])) or not _ends_path(text, end):
            at += 1
            continue
        out.append(text[start:at])
        if text.startswith("/", end):
            out.append("" if shown == "." else shown + "/")
            end += 1
        else:
            out.append(shown)
        start = at = end
    out.append(text[start:])
    return "".join(out)


def _error(exc, message=None, type_name=None):
    """The `{type, message, traceback}` payload of an exception, without host paths."""
    if message is None:
        try:
            message = str(exc)
        except BaseException:
            message = "<exception str() failed>"
    try:
        import traceback

        text = "".join(
            traceback.format_exception(type(exc), exc, _user_traceback(exc.__traceback__))
        )
    except BaseException as failure:
        text = "(traceback unavailable: %s)" % type(failure).__name__
    return {
        "type": type_name or type(exc).__qualname__,
        "message": _clean(_sandbox_paths(message), _MAX_MESSAGE_CHARS),
        "traceback": _clean(_sandbox_paths(text), _MAX_TRACEBACK_CHARS, tail=True),
    }


# --- loading the handler ----------------------------------------------------------------


class _InitFailure(Exception):
    def __init__(self, payload):
        super().__init__(payload["message"])
        self.payload = payload


def _simple_error(type_name, message):
    return {"type": type_name, "message": message, "traceback": ""}


def _load(spec, new_code):
    """Imports the handler named by `spec` (`module.function`) and returns the callable.

    `new_code`: this is the deploy's check of new code (NIMBUS_DEPLOY_CHECK=1), which also
    applies the rules only new code must meet; a version deployed before a rule existed is
    immutable and keeps starting as it did."""
    module_name, _, func_name = spec.rpartition(".")
    if not module_name or not func_name or "" in module_name.split("."):
        raise _InitFailure(
            _simple_error(
                "InvalidHandler",
                "handler %r must be 'module.function' (e.g. 'handler.handle' or "
                "'pkg.mod.run')" % spec,
            )
        )
    top = module_name.partition(".")[0]
    stdlib = getattr(sys, "stdlib_module_names", ())
    if new_code and (top in sys.modules or top in stdlib or top in _RUNTIME_MODULES):
        # Loaded first, the function's file would replace the standard library's module for
        # the function and the runtime alike; loaded already, it would never be imported and
        # the handler would name the library's own function (`os.system`).
        raise _InitFailure(
            _simple_error(
                "InvalidHandler",
                "handler module '%s' cannot be loaded: '%s' is the name of %s, which the "
                "function's %s would shadow; rename it"
                % (
                    module_name,
                    top,
                    "a module of the runtime"
                    if top in _RUNTIME_MODULES
                    else "a standard-library module",
                    top + ("/" if "." in module_name else ".py"),
                ),
            )
        )
    try:
        __import__(module_name)
        module = sys.modules[module_name]
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            path = module_name.replace(".", "/")
            raise _InitFailure(
                _error(
                    exc,
                    "handler module '%s' not found: the function's code has no %s.py "
                    "(nor a %s/ package)" % (module_name, path, path),
                )
            ) from None
        raise _InitFailure(
            _error(exc, "error while importing handler module '%s': %s" % (module_name, exc))
        ) from None
    except BaseException as exc:
        try:
            detail = str(exc)
        except BaseException:
            detail = ""
        message = "error while importing handler module '%s'" % module_name
        if detail:
            message += ": " + detail
        raise _InitFailure(_error(exc, message)) from None

    try:
        fn = getattr(module, func_name)
    except AttributeError:
        names = sorted(
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and callable(value) and not isinstance(value, type)
        )
        message = "handler function '%s' not found in module '%s'" % (func_name, module_name)
        if names:
            message += " (it defines: %s)" % ", ".join(names[:10])
        raise _InitFailure(_simple_error("AttributeError", message)) from None
    if not callable(fn):
        raise _InitFailure(
            _simple_error(
                "TypeError",
                "handler '%s' is not callable (it is a %s)" % (spec, type(fn).__name__),
            )
        )
    return fn


def _takes_state(fn):
    """Whether the handler accepts a second positional argument (`handle(event, state)`).

    Looks at the code object rather than importing `inspect` (slow and heavy): follows
    `functools.wraps` chains, discounts the bound `self` of methods and of callable
    instances, and treats `*args` as accepting state. Callables without a Python code
    object (builtins, partials) get the event only.
    """
    bound = 0
    if isinstance(fn, type):
        fn = fn.__init__
        bound = 1
    else:
        func = getattr(fn, "__func__", None)
        if func is not None:
            # A bound method: its function takes `self` first.
            if getattr(fn, "__self__", None) is not None:
                bound = 1
            fn = func
        elif getattr(fn, "__code__", None) is None:
            # A callable instance.
            fn = getattr(type(fn), "__call__", None)
            bound = 1
    for _ in range(100):
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is None:
            break
        fn = wrapped
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    if code.co_flags & _CO_VARARGS:
        return True
    return code.co_argcount - bound >= 2


# --- serving ----------------------------------------------------------------------------


class _ProtocolError(BaseException):
    """The host sent something the worker cannot understand: the worker exits
    (BaseException: a handler's `except Exception` around a state call does not swallow
    it)."""


class _BadEvent(Exception):
    """An invoke frame whose event cannot be decoded (e.g. an integer over Python's digit
    limit, or nesting deeper than the recursion limit): answered with an error result."""

    def __init__(self, msg_id, message):
        super().__init__(message)
        self.msg_id = msg_id


class _Host:
    """The worker's end of the host connection."""

    def __init__(self):
        self.sock = _socket.socket(fileno=_SOCKET_FD)
        self.reader = io.open(_SOCKET_FD, "rb", buffering=1 << 16, closefd=False)

    def read(self):
        """The next message, or None at end of stream."""
        read = self.reader.read
        head = read(4)
        if len(head) < 4:
            return None
        size = int.from_bytes(head, "big")
        data = read(size)
        if len(data) < size:
            return None
        text = ""
        try:
            text = data.decode("utf-8")
            return _scan(text, 0)[0]
        except Exception as exc:
            failure = exc
        # Frames start `{"type":"invoke","id":N,`: find the id to answer with an error.
        msg_id = None
        if text.startswith('{"type":"invoke","id":'):
            digits = text[22:].partition(",")[0]
            if digits.isdigit():
                msg_id = int(digits)
        if msg_id is None:
            raise _ProtocolError("invalid frame from the host: %r" % (failure,))
        raise _BadEvent(msg_id, "the event could not be decoded: %s" % (failure,))

    def send(self, message):
        payload = "".join(_encode(message, 0)).encode("ascii")
        self.send_raw(payload)

    def send_raw(self, payload):
        self.sock.sendall(len(payload).to_bytes(4, "big") + payload)


def _state_caller(host, api):
    """The function `state` objects call: one request to the host, its answer (a dict with
    `value` and `version`) or the typed exception it stands for.

    Only the handler's own thread may call it, while its invocation runs: the connection
    carries one exchange at a time, and a call from another thread (or after the handler
    returned) would interleave with the worker's own frames or land in the next
    invocation."""
    counter = [0]
    read = host.read
    send_raw = host.send_raw
    encode = _encode
    limit = _MAX_FRAME_BYTES - 64
    get_ident = _thread.get_ident
    serving = get_ident()

    def call(request):
        if api._request_id is None or get_ident() != serving:
            raise api.StateError(
                "state can be used only by the handler's own thread while its invocation "
                "runs (not from other threads, nor after the handler returned)",
                "invalid_argument",
            )
        counter[0] += 1
        msg_id = counter[0]
        request["type"] = "state"
        request["id"] = msg_id
        try:
            payload = "".join(encode(request, 0)).encode("ascii")
        except Exception as exc:
            _markers.clear()  # the encoder leaves entries behind when it fails
            if isinstance(exc, (TypeError, ValueError)):
                raise TypeError("the state value is not JSON-serializable: %s" % (exc,)) from None
            raise
        if len(payload) > limit:
            raise api.StateValueTooLarge(
                "the state value is %d bytes of JSON, over the %d-byte frame limit"
                % (len(payload), limit)
            )
        send_raw(payload)
        reply = read()
        if reply is None:
            raise _HostGone()
        if reply.get("type") != "state_result" or reply.get("id") != msg_id:
            raise _ProtocolError("expected state_result %d, got %r" % (msg_id, reply.get("type")))
        if reply.get("ok"):
            return reply
        raise api._state_error(reply.get("error") or {})

    return call


class _HostGone(BaseException):
    """The host closed the connection while a handler waited for state: nobody will read a
    result, so the worker ends (BaseException: the handler's `except Exception` does not
    swallow it)."""


def _reap_orphans():
    while True:
        try:
            if posix.waitpid(-1, posix.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _exit(code):
    # Skips waiting for non-daemon threads the function may have started.
    posix._exit(code)


def _run_coroutine(coro):
    """Runs a coroutine returned by the handler on the worker's (lazily created) event loop."""
    global _loop
    if _loop is None:
        import asyncio

        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(coro)


_loop = None


def _result_error(msg_id, payload, sink):
    return {
        "type": "result",
        "id": msg_id,
        "ok": False,
        "error": payload,
        "logs": sink.take(),
        "max_rss_kb": getrusage(RUSAGE_SELF).ru_maxrss,
    }


def _serve(host, handler, takes_state, api, sink):
    disabled = api._DISABLED_STATE
    live = api._State(_state_caller(host, api))
    read = host.read
    send = host.send
    send_raw = host.send_raw
    encode = _encode
    join = "".join
    take = sink.take
    clear = sink.clear
    coroutine_type = _coroutine_type
    # PID 1 of its own namespace (a forked instance) inherits every orphan there.
    reap = posix.getpid() == 1
    while True:
        try:
            msg = read()
        except _BadEvent as bad:
            send(_result_error(bad.msg_id, _simple_error("InvalidEvent", str(bad)), sink))
            continue
        if msg is None:
            return
        kind = msg["type"]
        if kind == "invoke":
            msg_id = msg["id"]
            clear()  # anything printed between invocations belongs to none
            api._request_id = msg.get("request_id")
            try:
                if takes_state:
                    value = handler(msg["event"], live if msg.get("state") else disabled)
                else:
                    value = handler(msg["event"])
                if value.__class__ is coroutine_type:
                    value = _run_coroutine(value)
            except BaseException as exc:
                if isinstance(exc, (_HostGone, _ProtocolError)):
                    raise  # the connection is over, or out of step: nothing to answer
                if isinstance(exc, SystemExit):
                    # The function asked the process to end: report it, then do so.
                    message = "the handler called sys.exit(%r); the instance stops" % (exc.code,)
                    send(_result_error(msg_id, _error(exc, message), sink))
                    _exit(1)
                send(_result_error(msg_id, _error(exc), sink))
                if isinstance(exc, KeyboardInterrupt):
                    _exit(1)
                continue
            finally:
                api._request_id = None
            out = {
                "type": "result",
                "id": msg_id,
                "ok": True,
                "body": value,
                "logs": take(),
                "max_rss_kb": getrusage(RUSAGE_SELF).ru_maxrss,
            }
            try:
                payload = join(encode(out, 0)).encode("ascii")
            except BaseException as exc:
                _markers.clear()  # the encoder leaves entries behind when it fails
                del out["body"]
                out["ok"] = False
                out["error"] = {
                    "type": "TypeError",
                    "message": _clean(
                        "the handler's return value is not JSON-serializable: %s" % (exc,),
                        _MAX_MESSAGE_CHARS,
                    ),
                    "traceback": "",
                }
                payload = join(encode(out, 0)).encode("ascii")
            if len(payload) > _MAX_FRAME_BYTES - 64:
                del out["body"]
                out["ok"] = False
                out["error"] = {
                    "type": "ResultTooLarge",
                    "message": "the handler's return value is %d bytes of JSON, over the "
                    "%d-byte limit" % (len(payload), _MAX_FRAME_BYTES - 64),
                    "traceback": "",
                }
                payload = join(encode(out, 0)).encode("ascii")
            send_raw(payload)
            if reap:
                _reap_orphans()
        elif kind == "ping":
            send({"type": "pong", "id": msg["id"]})
        # Other messages (from newer hosts) are ignored.


# --- snapshots (template mode) ------------------------------------------------------------


def _loads(text):
    return _scan(text, 0)[0]


def _dumps(message):
    return "".join(_encode(message, 0)).encode("ascii")


class _HookTimeout(BaseException):
    """Raised in a hook that ran past its budget (BaseException: `except Exception` in the
    hook does not swallow it)."""


def _hook_budget():
    """Seconds all hooks of one kind may take together (NIMBUS_HOOK_BUDGET_MS)."""
    raw = posix.environ.get(b"NIMBUS_HOOK_BUDGET_MS", b"")
    return int(raw) / 1000.0 if raw.isdigit() and int(raw) > 0 else 1.0


def _run_hooks(hooks, kind):
    """Runs the `@nimbus.<kind>` hooks in order within the budget; a failure is an init
    failure naming the hook."""
    if not hooks:
        return
    import signal

    budget = _hook_budget()

    def expired(_signum, _frame):
        raise _HookTimeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        for hook in hooks:
            name = getattr(hook, "__qualname__", None) or repr(hook)
            try:
                hook()
            except _HookTimeout:
                raise _InitFailure(
                    _simple_error(
                        "HookTimeout",
                        "@nimbus.%s hook %s did not finish within %g s" % (kind, name, budget),
                    )
                ) from None
            except BaseException as exc:
                raise _InitFailure(
                    _error(exc, "@nimbus.%s hook %s raised %s: %s" % (kind, name, type(exc).__name__, exc))
                ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _prepare_template(handler, takes_state, api):
    """Readies this worker to be a template: before-snapshot hooks, the optional warm-up
    invocation, and the fork machinery (imported now, so its objects are frozen and shared
    too). Returns (module, fork configuration)."""
    global _loop
    _run_hooks(api._before_snapshot, "before_snapshot")
    if posix.environ.get(b"NIMBUS_WARMUP") == b"1":
        try:
            value = handler({"warmup": True}, api._DISABLED_STATE) if takes_state else handler({"warmup": True})
            if value.__class__ is _coroutine_type:
                _run_coroutine(value)
        except BaseException as exc:
            raise _InitFailure(_error(exc, "the warm-up invocation raised %s: %s" % (type(exc).__name__, exc))) from None
        finally:
            # An event loop's descriptors must not be shared by the forked instances.
            if _loop is not None:
                _loop.close()
                _loop = None
    try:
        import nimbus_entropy
        import nimbus_fork

        nimbus_entropy.prepare(api._deterministic)
        return nimbus_fork, nimbus_fork.load_config(_loads)
    except BaseException as exc:
        raise _InitFailure(_error(exc, "the template could not be prepared: %s" % exc)) from None


def _restored(instance_id, api):
    """In an instance started from a snapshot: a fresh identity and fresh randomness, then
    the user's after-restore hooks."""
    if instance_id:
        import os

        os.environ["NIMBUS_INSTANCE_ID"] = instance_id
    sys.modules["nimbus_entropy"].reseed()
    _run_hooks(api._after_restore, "after_restore")


def _measure(api):
    """In a probe of the template (see nimbus_fork's `probe`): readied as an instance is,
    what every generator the template holds gives once (JSON)."""
    try:
        _restored(None, api)
    except _InitFailure:
        pass  # a failing hook fails the real starts, naming it; generators still compare
    return _dumps({"fingerprints": sys.modules["nimbus_entropy"].fingerprints()})


async def _probe_coroutine():
    pass


_probe = _probe_coroutine()
_coroutine_type = type(_probe)
_probe.close()
del _probe


def _init_failed(host, payload, sink):
    """Reports that the worker cannot serve (the handler did not load, a hook failed) and
    exits."""
    host.send({"type": "init_error", "error": payload, "logs": sink.take()})
    _exit(1)


def _ready(host, sink, init_from, start_from):
    """Greets the host: the handler is loaded (since `init_from`; the worker started at
    `start_from`)."""
    now = perf_counter()
    host.send(
        {
            "type": "ready",
            "pid": posix.getpid(),
            "runtime": "python%d.%d" % sys.version_info[:2],
            "init_ms": round((now - init_from) * 1000.0, 3),
            "start_ms": round((now - start_from) * 1000.0, 3),
            "logs": sink.take(),
        }
    )


def main():
    try:
        host = _Host()
    except OSError as exc:
        posix.write(
            2, ("nimbus_worker: fd %d is not the host socket: %s\n" % (_SOCKET_FD, exc)).encode()
        )
        _exit(2)

    sink = _Sink()
    sys.stdout = _Capture("<stdout>", sink)
    sys.stderr = _Capture("<stderr>", sink)
    if sys.path and sys.path[0] == _RUNTIME_DIR:
        del sys.path[0]  # put there by nimbus_boot.py

    spec = posix.environ.get(b"NIMBUS_HANDLER", b"").decode("utf-8", "surrogateescape").strip()
    loaded = perf_counter()
    try:
        # The runtime's `nimbus` package is imported before the function's code is on the
        # path: `import nimbus` always means the platform's API.
        sys.path.insert(0, _RUNTIME_DIR)
        try:
            import nimbus as api

            if posix.environ.get(b"NIMBUS_TEMPLATE") == b"1":
                # So are the template's own modules: a file of the function's code named
                # like one must not take its place.
                import nimbus_entropy  # noqa: F401
                import nimbus_fork  # noqa: F401
        except BaseException as exc:
            raise _InitFailure(_error(exc, "the runtime's nimbus package failed to load: %s" % exc))
        # The function's code first, then the runtime directory, then the stdlib.
        sys.path[0:1] = [posix.getcwd(), _RUNTIME_DIR]
        new_code = posix.environ.get(b"NIMBUS_DEPLOY_CHECK") == b"1"
        handler = _load(spec or _DEFAULT_HANDLER, new_code)
        takes_state = _takes_state(handler)
    except _InitFailure as failure:
        _init_failed(host, failure.payload, sink)
    except BaseException as exc:
        _init_failed(host, _error(exc), sink)
    template = None
    if posix.environ.get(b"NIMBUS_TEMPLATE") == b"1":
        try:
            template = _prepare_template(handler, takes_state, api)
        except _InitFailure as failure:
            _init_failed(host, failure.payload, sink)
    _ready(host, sink, loaded, _T0)
    gc.collect()
    # Objects that exist now are never collected again: a forked child's collections then
    # leave the template's pages shared instead of touching (and copying) them.
    gc.freeze()
    if template is not None:
        nimbus_fork, config = template
        prober = (lambda: _measure(api), sys.modules["nimbus_entropy"].same)
        instance_id = nimbus_fork.serve(host.sock, config, _loads, _dumps, prober)
        # In a forked child from here on, in its own sandbox, on its own connection.
        forked = perf_counter()
        host = _Host()
        try:
            _restored(instance_id, api)
        except _InitFailure as failure:
            _init_failed(host, failure.payload, sink)
        _ready(host, sink, forked, forked)
    try:
        _serve(host, handler, takes_state, api, sink)
    except (OSError, _HostGone):
        pass  # the host went away
    except _ProtocolError as exc:
        posix.write(2, ("nimbus_worker: %s\n" % exc).encode("utf-8", "replace"))
        _exit(2)
    _exit(0)


if __name__ == "__main__":
    main()
