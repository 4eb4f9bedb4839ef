"""Template mode of the Nimbus Python worker: fork new instances from an initialized worker.

Imported by nimbus_worker only in a template (NIMBUS_TEMPLATE=1), after the function's code
is loaded. `serve` then answers the driver's fork requests on fd 3 (the fork protocol of
the nimbus-sandbox crate's `fork` module):

    driver -> template   {"type": "fork", "instance_id": ...} + a socket (SCM_RIGHTS)
    template -> driver   {"type": "forked", "ok": true} | {"ok": false, "error": ...}
    driver -> template   {"type": "spare"}     (fork a child ahead, see `serve`)
    template -> driver   {"type": "spared", "ok": ...}
    driver -> template   {"type": "detach"}    (before a checkpoint)
    template -> driver   {"type": "detached", "ok": true} + the driver's end of a new
                         connection made inside the sandbox, which replaces fd 3
    driver -> template   {"type": "probe"}     (after a build or a restore, see `probe`)
    template -> driver   {"type": "probed", "ok": true, "compared": N, "same": [...],
                          "same_count": N}

and returns only in a forked child, once that child runs in a sandbox of its own (when the
template's root holds /.nimbus/fork.json) and the driver has moved it into its cgroup: the
child sends b"H" on its new socket and waits for b"G". Everything here happens before the
function's code runs again in the child. After its first request the template keeps a
spare child, forked and sandboxed ahead, to hand the next request to (see `serve`).
"""

import _socket
import ctypes
import posix
import signal
import stat

_SOCKET_FD = 3
_FORK_CONFIG = "/.nimbus/fork.json"
# Most generator names a probe's answer carries.
_SAME_NAMES_SHOWN = 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SIGKILL = 9
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


class ForkError(Exception):
    """A step of entering the child's sandbox failed."""


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise ForkError("%s: %s" % (what, posix.strerror(errno)))


def load_config(loads):
    """The fork configuration the sandbox init left in the template's root, or None when the
    template is not isolated. `loads` parses JSON."""
    try:
        fd = posix.open(_FORK_CONFIG, posix.O_RDONLY | posix.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = b""
        while True:
            chunk = posix.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        posix.close(fd)
    config = loads(data.decode("utf-8"))
    filter_bytes = bytes.fromhex(config["filter"])
    config["filter_buffer"] = ctypes.create_string_buffer(filter_bytes, len(filter_bytes))
    config["filter_len"] = len(filter_bytes) // 8
    return config


def _threads():
    return len(posix.listdir("/proc/self/task"))


def _recv_exact(sock, size, fds):
    """`size` bytes from `sock`, collecting descriptors passed with them into `fds`."""
    data = b""
    while len(data) < size:
        chunk, ancillary, _flags, _addr = sock.recvmsg(
            size - len(data), _socket.CMSG_SPACE(4 * 4), _socket.MSG_CMSG_CLOEXEC
        )
        if not chunk:
            return None
        data += chunk
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                for i in range(0, usable, 4):
                    fds.append(int.from_bytes(payload[i : i + 4], "little"))
    return data


def _send(sock, encode, message):
    payload = encode(message)
    sock.sendall(len(payload).to_bytes(4, "big") + payload)


def serve(sock, config, loads, encode, prober):
    """Answers fork requests until the driver closes the connection (then exits the
    template). Returns the new instance id in a forked child, ready to serve.
    `prober` is `(measure, same)`: see `probe`.

    The template keeps one child forked ahead (a spare), already in its sandbox and
    waiting on a channel of its own: the next request is handed to it, which spares that
    request the fork and the sandbox set-up, and a new spare is forked after the answer.
    The first spare comes with the first request or a `spare` request, whichever is
    first (a checkpoint, taken before either, must find the template alone)."""
    # Children are reaped as they end, so whoever watches them learns how they ended.
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: _reap())
    spare = None
    while True:
        fds = []
        head = _recv_exact(sock, 4, fds)
        body = head and _recv_exact(sock, int.from_bytes(head, "big"), fds)
        if not body:
            posix._exit(0)
        message = loads(body.decode("utf-8"))
        if message.get("type") == "spare" and not fds:
            # Ready for the first request before it comes (after any checkpoint).
            if spare is None:
                spare, channel = _fork_spare()
                if channel is not None:
                    return _become_spare(sock, channel, config, loads)
            _send(sock, encode, {"type": "spared", "ok": spare is not None})
            continue
        if message.get("type") == "probe" and not fds:
            _send(sock, encode, probe(config, loads, encode, *prober))
            continue
        if message.get("type") == "detach" and not fds:
            if spare is not None:
                spare.close()  # the spare exits when its channel closes
                spare = None
            _detach(encode)
            continue
        if message.get("type") != "fork" or len(fds) != 1:
            for fd in fds:
                posix.close(fd)
            _send(sock, encode, {"type": "forked", "ok": False, "error": "bad fork request"})
            continue
        instance_fd = fds[0]
        instance_id = message.get("instance_id")
        if spare is not None:
            handed = _hand_over(spare, instance_fd, instance_id, encode)
            spare.close()
            spare = None
            if handed:
                posix.close(instance_fd)
                _send(sock, encode, {"type": "forked", "ok": True})
                spare, channel = _fork_spare()
                if channel is not None:
                    return _become_spare(sock, channel, config, loads)
                continue
        try:
            if _threads() != 1:
                raise ForkError(
                    "the function's code started threads while loading; a template must stay "
                    "single-threaded to be forked"
                )
            pid = posix.fork()
        except Exception as exc:
            posix.close(instance_fd)
            _send(sock, encode, {"type": "forked", "ok": False, "error": str(exc)})
            continue
        if pid == 0:
            return _become_instance(sock, instance_fd, config, instance_id)
        posix.close(instance_fd)
        _send(sock, encode, {"type": "forked", "ok": True})
        spare, channel = _fork_spare()
        if channel is not None:
            return _become_spare(sock, channel, config, loads)


def probe(config, loads, encode, measure, same):
    """Forks two probes readied as instances are (each in a sandbox of its own, PID 1 of its
    pid namespace like every instance), in which `measure` reseeds, runs the after-restore
    hooks and draws once from every generator the template holds (JSON bytes of
    `{"fingerprints": {key: output}}`); `same(first, second)` names the generators that
    gave both the same output: instances forked from this template would share them.
    Returns once both probes are gone, so the template is alone again (a checkpoint may
    follow)."""
    if _threads() != 1:
        return {"type": "probed", "ok": False, "error": "the template runs threads"}
    probes = []
    for _ in range(2):
        read_end, write_end = posix.pipe()
        try:
            pid = posix.fork()
        except OSError as exc:
            posix.close(read_end)
            posix.close(write_end)
            probes.append((None, {"error": "fork: %s" % exc}))
            continue
        if pid == 0:
            posix.close(read_end)
            _probe_child(write_end, config, encode, measure)
        posix.close(write_end)
        probes.append((pid, read_end))
    reports = []
    for pid, source in probes:
        if pid is None:
            reports.append(source)
            continue
        try:
            data = _read_all(source)
        finally:
            posix.close(source)
        try:
            posix.waitpid(pid, 0)
        except ChildProcessError:
            pass  # reaped by the SIGCHLD handler
        try:
            reports.append(loads(data.decode("utf-8")) if data else {"error": "it ended silently"})
        except ValueError as exc:
            reports.append({"error": "its report: %s" % exc})
    for report in reports:
        if "error" in report or not isinstance(report.get("fingerprints"), dict):
            return {"type": "probed", "ok": False, "error": "a probe failed: %s" % report.get("error")}
    first, second = (report["fingerprints"] for report in reports)
    compared = sum(1 for key in first if key in second)
    names = same(first, second)
    return {
        "type": "probed",
        "ok": True,
        "compared": compared,
        # A few names say what to fix; all of them could outgrow a frame.
        "same": names[:_SAME_NAMES_SHOWN],
        "same_count": len(names),
    }


def _probe_child(write_end, config, encode, measure):
    """In a probe: readies itself as an instance, writes its report, exits."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        posix.close(_SOCKET_FD)  # the driver's connection stays the template's alone
        _prepare(config, wait=True)
        report = measure()
    except BaseException as exc:
        report = encode({"error": "%s: %s" % (type(exc).__name__, exc)})
    try:
        while report:
            report = report[posix.write(write_end, report) :]
    finally:
        posix._exit(0)


def _read_all(fd):
    chunks = []
    while True:
        chunk = posix.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _fork_spare():
    """Forks a spare. In the template: (its end of the spare's channel, None), or
    (None, None) if it cannot; in the spare: (None, the spare's end)."""
    try:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    except OSError:
        return None, None
    try:
        pid = posix.fork() if _threads() == 1 else -1
    except OSError:
        pid = -1
    if pid == 0:
        ours.close()
        return None, theirs
    theirs.close()
    if pid < 0:
        ours.close()
        return None, None
    return ours, None


def _hand_over(spare, instance_fd, instance_id, encode):
    """Gives the spare its instance's socket and id; False if the spare is gone."""
    try:
        spare.sendmsg(
            [encode({"instance_id": instance_id})],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, instance_fd.to_bytes(4, "little"))],
        )
        return True
    except OSError:
        return False


def _become_spare(control, channel, config, loads):
    """In a spare: enters the sandbox now, waits for an instance to become, becomes it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The driver's connection stays the template's alone.
    control.detach()
    posix.close(_SOCKET_FD)
    try:
        _prepare(config)
        data, ancillary, _flags, _addr = channel.recvmsg(
            4096, _socket.CMSG_SPACE(4), _socket.MSG_CMSG_CLOEXEC
        )
    except BaseException:
        posix._exit(1)  # the template forks directly when its spare is gone
    if not data:
        posix._exit(0)  # the template dropped it
    fds = [
        int.from_bytes(payload[i : i + 4], "little")
        for level, kind, payload in ancillary
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
        for i in range(0, len(payload) - len(payload) % 4, 4)
    ]
    channel.close()
    if len(fds) != 1:
        posix._exit(1)
    instance_id = loads(data.decode("utf-8")).get("instance_id")
    return _as_instance(fds[0], instance_id, config, prepared=True)


def _detach(encode):
    """Moves the template onto a connection made inside its sandbox (a checkpoint cannot
    take along a socket that belongs to the host's network namespace): sends the driver
    the other end, then puts this end on fd 3, which closes the old connection."""
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    # The answer goes out on the old connection once fd 3 is the new one: when the driver
    # reads it, the switch is done.
    old = _socket.socket(fileno=posix.dup(_SOCKET_FD))
    posix.dup2(ours.fileno(), _SOCKET_FD)
    ours.close()
    payload = encode({"type": "detached", "ok": True})
    old.sendmsg(
        [len(payload).to_bytes(4, "big") + payload],
        [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, theirs.fileno().to_bytes(4, "little"))],
    )
    theirs.close()
    old.close()


def _reap():
    """Reaps the children that ended (an isolated child's first process exits at once)."""
    while True:
        try:
            pid, _status = posix.waitpid(-1, posix.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_instance(control, instance_fd, config, instance_id):
    """In a child forked for a request: enters the sandbox, becomes the instance."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The control socket object must not close fd 3, which is about to be the instance's.
    control.detach()
    return _as_instance(instance_fd, instance_id, config, prepared=False)


def _prepare(config, wait=False):
    """The sandbox of a child (isolated), or its tie to the template's life (not). `wait`:
    see `_enter_sandbox`."""
    if config is None:
        # Not isolated: die with the template, as the template dies with the server.
        _check(_libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0), "prctl")
    else:
        _enter_sandbox(config, wait)


def _as_instance(instance_fd, instance_id, config, prepared):
    """Puts the instance's socket on fd 3, prepares the child unless it is already (a
    spare), greets the driver and waits until it is in its cgroup."""
    try:
        if instance_fd != _SOCKET_FD:  # a spare, whose fd 3 was free, receives it there
            posix.dup2(instance_fd, _SOCKET_FD)
            posix.close(instance_fd)
        if not prepared:
            _prepare(config)
        posix.write(_SOCKET_FD, b"H")
        if posix.read(_SOCKET_FD, 1) != b"G":
            posix._exit(1)
    except BaseException as exc:
        try:
            posix.write(_SOCKET_FD, ("E%s" % (exc,)).encode("utf-8", "replace"))
        finally:
            posix._exit(1)
    return instance_id


def _enter_sandbox(config, wait=False):
    """Namespaces, private /tmp, /dev/shm and /proc, no capabilities, the worker filter.
    Goes on in a child, PID 1 of a new pid namespace; the process that called it exits at
    once, or with `wait` once that child has ended (so that whoever waits for it knows the
    child is gone too)."""
    uid, gid = posix.geteuid(), posix.getegid()
    _check(_libc.unshare(config["namespaces"]), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", "%d %d 1" % (uid, uid))
    _write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
    # The new pid namespace takes this process's next child as its PID 1. (A template
    # can make a pid namespace for its children only once, so each child makes its own.)
    child = posix.fork()
    if child != 0:
        if wait:
            posix.waitpid(child, 0)
        posix._exit(0)
    tmpfs, private, bind = config["mount_flags"]
    size = ("size=%dm,mode=1777" % config["tmp_mb"]).encode()
    # Handles on what lives under /tmp before a fresh /tmp hides it.
    handles = [(path, posix.open(path, posix.O_PATH | posix.O_CLOEXEC)) for path in config["rebind"]]
    _mount(b"tmpfs", b"/tmp", b"tmpfs", tmpfs, size)
    _mount(b"tmpfs", b"/dev/shm", b"tmpfs", private, size)
    for path, handle in handles:
        _make_mount_point(path, handle)
        _mount(("/proc/self/fd/%d" % handle).encode(), path.encode(), None, bind, None)
        posix.close(handle)
    for path, target in config["links"]:
        _make_parents(path)
        posix.symlink(target, path)
    _mount(b"proc", b"/proc", b"proc", private, None)
    for cap in range(64):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    program = _SockFprog(config["filter_len"], ctypes.addressof(config["filter_buffer"]))
    _check(
        _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(program), 0, 0),
        "installing the seccomp filter",
    )


def _mount(source, target, fstype, flags, data):
    _check(_libc.mount(source, target, fstype, flags, data), "mount %s" % target.decode())


def _write(path, text):
    fd = posix.open(path, posix.O_WRONLY)
    try:
        posix.write(fd, text.encode())
    finally:
        posix.close(fd)


def _make_parents(path):
    parts = path.strip("/").split("/")[:-1]
    current = ""
    for part in parts:
        current += "/" + part
        try:
            posix.mkdir(current, 0o755)
        except FileExistsError:
            pass


def _make_mount_point(path, handle):
    _make_parents(path)
    if stat.S_ISDIR(posix.fstat(handle).st_mode):
        try:
            posix.mkdir(path, 0o755)
        except FileExistsError:
            pass
    else:
        posix.close(posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_CLOEXEC, 0o644))
