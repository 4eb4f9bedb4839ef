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
    "StateNotEnabled",
    "after_restore",
    "before_snapshot",
    "current_request_id",
]

# Set by the worker before each invocation.
_request_id = None
# Registered hooks, run by the worker.
_before_snapshot = []
_after_restore = []


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
    connections, reseed random generators of your own (`random` is reseeded already),
    refresh per-instance values.

    A hook that raises or runs past its time budget fails the instance's start.
    """
    _after_restore.append(fn)
    return fn


class NimbusError(Exception):
    """Base class of the errors raised by the Nimbus runtime API."""


class StateNotEnabled(NimbusError):
    """The function used `state` but state is not enabled for it."""


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
