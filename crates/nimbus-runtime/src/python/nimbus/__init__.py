"""Nimbus: the API that Python functions running on Nimbus can import.

    import nimbus

    def handle(event, state):
        try:
            count = state.incr("visits")
        except nimbus.StateNotEnabled:
            count = None
        return {"request_id": nimbus.current_request_id(), "visits": count}

This package is installed by the Nimbus server next to its Python worker and is importable
by every function (a module of the same name in the function's own code takes precedence).
"""

__all__ = [
    "NimbusError",
    "StateConflict",
    "StateError",
    "StateKeyTooLong",
    "StateNotEnabled",
    "StateTooManyKeys",
    "StateUnavailable",
    "StateValueTooLarge",
    "after_restore",
    "before_snapshot",
    "current_request_id",
    "deterministic",
]

# Set by the worker before each invocation.
_request_id = None
# Registered hooks, run by the worker.
_before_snapshot = []
_after_restore = []
# Generators meant to repeat in every instance (see `deterministic`).
_deterministic = []


def before_snapshot(fn):
    """Decorator: run `fn()` once before this function's snapshot is taken (after its code
    is loaded, in the template that new instances are started from). Close what must not be
    shared by the instances: network connections, open files, background threads.

    A hook that raises or runs past its time budget fails the snapshot; instances then
    start cold (and run no hooks).
    """
    _before_snapshot.append(fn)
    return fn


def after_restore(fn):
    """Decorator: run `fn()` in every instance started from a snapshot, before its first
    invocation (not in instances started cold, whose module code just ran). Reopen
    connections, reseed random generators of your own (`random`, `tempfile`, OpenSSL and
    NumPy's global generator are reseeded already), refresh per-instance values.

    A hook that raises or runs past its time budget fails the instance's start.
    """
    _after_restore.append(fn)
    return fn


def deterministic(generator):
    """Marks `generator` (a `random.Random` or NumPy generator) as meant to give the same
    sequence in every instance, e.g. one seeded with a constant, and returns it.

    Before a snapshot serves, two probe instances are forked from it and every generator
    found in them is drawn from: a snapshot whose instances would share a generator's
    output is refused (its instances start cold), unless the generator is marked here.
    """
    _deterministic.append(generator)
    return generator


class NimbusError(Exception):
    """Base class of the errors raised by the Nimbus runtime API."""


class StateError(NimbusError):
    """A state operation failed. `code` is the platform's stable error code."""

    code = "state_error"

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class StateNotEnabled(StateError):
    """The function used `state` but state is not enabled for it."""

    code = "state_not_enabled"


class StateConflict(StateError):
    """`set_with_version` held a stale version; `current_version` is the key's version now
    (0: the key is absent). Read again and retry."""

    code = "state_conflict"

    def __init__(self, message, current_version=0):
        super().__init__(message)
        self.current_version = current_version


class StateValueTooLarge(StateError):
    """The value is larger than the function's `max_state_size`. Nothing was written."""

    code = "value_too_large"


class StateTooManyKeys(StateError):
    """Writing a new key would pass the function's `max_keys`. Nothing was written."""

    code = "too_many_keys"


class StateKeyTooLong(StateError):
    """The key is longer than 256 bytes. Nothing was written."""

    code = "key_too_long"


class StateUnavailable(StateError):
    """The state store cannot be reached right now; the operation may or may not have been
    applied if it was a write. Retry later."""

    code = "state_unavailable"


_STATE_ERRORS = {
    cls.code: cls
    for cls in (
        StateNotEnabled,
        StateConflict,
        StateValueTooLarge,
        StateTooManyKeys,
        StateKeyTooLong,
        StateUnavailable,
    )
}


def _state_error(error):
    """The exception for a failed operation as the host reports it."""
    code = error.get("code", "state_error")
    message = error.get("message", code)
    if code == "state_conflict":
        return StateConflict(message, error.get("current_version", 0))
    cls = _STATE_ERRORS.get(code)
    return cls(message) if cls is not None else StateError(message, code)


def current_request_id():
    """The request id (`inv_...`) of the invocation being served, or None outside one."""
    return _request_id


_STATE_NOT_ENABLED = (
    "state is not enabled for this function "
    "(enable it in the function's state_config to use the state API)"
)


class _DisabledState:
    """The `state` argument of a function whose state is not enabled.

    Any use raises StateNotEnabled. It is falsy, so `if state:` tells whether state is
    available without raising.
    """

    __slots__ = ()

    def __getattr__(self, name):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __call__(self, *args, **kwargs):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __getitem__(self, key):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __setitem__(self, key, value):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __delitem__(self, key):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __contains__(self, key):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __iter__(self):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __len__(self):
        raise StateNotEnabled(_STATE_NOT_ENABLED)

    def __bool__(self):
        return False

    def __repr__(self):
        return "<nimbus state: not enabled for this function>"


# The `state` the worker passes while state is not enabled.
_DISABLED_STATE = _DisabledState()


# Longest TTL, seconds (ten years, as the platform's).
_MAX_TTL = 10 * 365 * 24 * 3600
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _text(value, what):
    """`value` if it is a string the platform can take (UTF-8, so no lone surrogates)."""
    if value.__class__ is not str:
        raise TypeError("%s is a string, not %s" % (what, type(value).__name__))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise StateError("%s %r is not valid Unicode text" % (what, value), "invalid_key") from None
    return value


def _check_key(key):
    return _text(key, "a state key")


def _check_ttl(ttl):
    if ttl is None:
        return None
    if ttl.__class__ not in (int, float) or not 0 < ttl <= _MAX_TTL:
        raise ValueError("ttl is a number of seconds from 0.001 to %d, not %r" % (_MAX_TTL, ttl))
    return ttl


def _check_delta(delta):
    if delta.__class__ is not int:
        raise TypeError("delta is an integer, not %s" % type(delta).__name__)
    if not _INT64[0] <= delta <= _INT64[1]:
        raise StateError("delta %d does not fit in 64 bits" % delta, "not_an_integer")
    return delta


class _Scope:
    """One scope of the function's state: values are anything JSON can hold, keys are
    strings of at most 256 bytes. Every operation goes to the platform at once (there is no
    local cache), and writes are durable when they return."""

    __slots__ = ("_call", "_scope")

    def __init__(self, call, scope):
        self._call = call
        self._scope = scope

    def get(self, key, default=None):
        """The value of `key`, or `default` if it is absent (or expired)."""
        reply = self._call({"op": "get", "scope": self._scope, "key": _check_key(key)})
        return reply.get("value") if reply.get("version") else default

    def set(self, key, value, ttl=None):
        """Stores `value` under `key`, for `ttl` seconds (default: the function's
        default_ttl; none if that is 0). Returns the new version."""
        return self._call(
            {"op": "set", "scope": self._scope, "key": _check_key(key), "value": value,
             "ttl": _check_ttl(ttl)}
        )["version"]

    def delete(self, key):
        """Removes `key`; whether it was there."""
        return self._call({"op": "delete", "scope": self._scope, "key": _check_key(key)})["value"]

    def exists(self, key):
        """Whether `key` holds a value."""
        return self._call({"op": "exists", "scope": self._scope, "key": _check_key(key)})["value"]

    def keys(self, pattern="*"):
        """The keys matching the glob `pattern` (`*`, `?`, `\\` escapes), sorted."""
        pattern = _text(pattern, "the pattern")
        return self._call({"op": "keys", "scope": self._scope, "pattern": pattern})["value"]

    def incr(self, key, delta=1):
        """Adds `delta` (an integer) to the integer at `key` (absent: 0) atomically and
        returns the result. A new key gets the function's default_ttl."""
        return self._call(
            {"op": "incr", "scope": self._scope, "key": _check_key(key),
             "delta": _check_delta(delta)}
        )["value"]

    def decr(self, key, delta=1):
        """`incr(key, -delta)`."""
        return self.incr(key, -_check_delta(delta))

    def expire(self, key, ttl):
        """Lets `key` expire in `ttl` seconds (None: never); whether the key was there."""
        return self._call(
            {"op": "expire", "scope": self._scope, "key": _check_key(key), "ttl": _check_ttl(ttl)}
        )["value"]

    def get_with_version(self, key):
        """`(value, version)`; `(None, 0)` if absent. Pass the version to
        `set_with_version` to write only if nobody wrote in between."""
        reply = self._call(
            {"op": "get_with_version", "scope": self._scope, "key": _check_key(key)}
        )
        version = reply.get("version", 0)
        return (reply.get("value") if version else None, version)

    def set_with_version(self, key, value, version, ttl=None):
        """Stores `value` only if `key` is still at `version` (0: only if absent); raises
        StateConflict (with `current_version`) otherwise. Returns the new version."""
        if version.__class__ is not int or not 0 <= version <= _INT64[1]:
            raise TypeError("version is what get_with_version returned, not %r" % (version,))
        return self._call(
            {"op": "set_with_version", "scope": self._scope, "key": _check_key(key),
             "value": value, "version": version, "ttl": _check_ttl(ttl)}
        )["version"]

    def __repr__(self):
        return "<nimbus state: %s scope>" % self._scope


class _State(_Scope):
    """The `state` argument: the session's state (the invocation's session_key, or
    `_default` without one), with the other scopes a call away."""

    __slots__ = ("_function", "_invocation")

    def __init__(self, call):
        super().__init__(call, "session")
        self._function = _Scope(call, "function")
        self._invocation = _Scope(call, "invocation")

    def session(self):
        """This session's state (the same as `state` itself)."""
        return self

    def function(self):
        """State shared by every invocation of the function, whatever the session."""
        return self._function

    def invocation(self):
        """State of this invocation only, gone when it ends."""
        return self._invocation
