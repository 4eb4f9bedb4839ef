"""Fresh randomness in instances forked from a template (SPEC §6), and the check that it is.

Every instance forked from one template (or from a template restored from its checkpoint)
starts with a copy of the template's memory, generators' states included. Each is PID 1 of
its own pid namespace, so a library that detects a fork by a change of `getpid()` — OpenSSL
3 does — sees none. Imported by nimbus_worker in a template, before the template's memory
is frozen, so that every instance shares this module's pages.

- `reseed()` runs in every new instance before the function's code runs again: Python's
  `random` (its module instance), `tempfile`'s name sequence, every OpenSSL copy loaded in
  the process (`RAND_add` of fresh kernel entropy: the next draw of each thread's generator
  reseeds from it), NumPy's legacy global generator.
- `fingerprints(skip)` does not trust that list: in a probe instance (see nimbus_fork's
  `probe`) it draws from every generator it can find — the known ones and every
  `random.Random` and NumPy generator object on the heap, the function's own included —
  so that the template can compare two probes and refuse to start instances whose
  generators agree.
"""

import _random
import gc
import posix
import sys

# Bytes of kernel entropy mixed into each OpenSSL copy.
_SEED_BYTES = 48
# The OpenSSL copies of the template, found once by `prepare` (instances inherit them).
_copies = None


def prepare():
    """Finds, in the template, what `reseed` reseeds in every instance."""
    global _copies
    _copies = [lib for _path, lib in _openssl_copies()]


def reseed():
    """Reseeds every per-process generator the runtime can reach (in a new instance)."""
    random = sys.modules.get("random")
    if random is not None:
        random.seed()
    tempfile = sys.modules.get("tempfile")
    sequence = getattr(tempfile, "_name_sequence", None)
    generator = getattr(sequence, "_rng", None)
    if generator is not None:
        # Remade only when the pid changes, and every instance is PID 1.
        generator.seed()
    if _copies is None:
        prepare()
    for lib in _copies:
        seed = posix.urandom(_SEED_BYTES)
        lib.RAND_add(seed, len(seed), float(len(seed)))
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def fingerprints(skip=(), heap=True):
    """`{name: output}` of every generator found in this process, each drawn once (the
    process is a probe, thrown away after). `skip` holds objects meant to repeat. Without
    `heap`, only the generators `reseed` knows (the heap's were compared when the template
    was built: a scan touches, hence copies, every page of the probe's memory)."""
    if heap:
        gc.unfreeze()  # frozen objects are not listed otherwise
        skipped = {id(obj) for obj in skip}
        found = [obj for obj in gc.get_objects() if _is_generator(obj) and id(obj) not in skipped]
    else:
        random = sys.modules.get("random")
        numpy_random = sys.modules.get("numpy.random.mtrand")
        known = (getattr(random, "_inst", None), getattr(numpy_random, "_rand", None))
        found = [obj for obj in known if obj is not None]
    names = _global_names()
    out = {}
    for obj in found:
        name = _describe(obj, names)
        try:
            out[name] = _draw(obj)
        except Exception as exc:
            out[name] = "draw failed: %s" % type(exc).__name__
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        out["tempfile names"] = next(tempfile._get_candidate_names())
    for path, lib in _openssl_copies():
        buffer = (_ctypes().c_ubyte * 16)()
        if lib.RAND_bytes(buffer, 16) == 1:
            out["OpenSSL RAND_bytes (%s)" % path.rpartition("/")[2]] = bytes(buffer).hex()
    return out


def _is_generator(obj):
    if isinstance(obj, _random.Random):
        random = sys.modules.get("random")
        # SystemRandom draws from the kernel every time.
        return random is None or not isinstance(obj, random.SystemRandom)
    kind = type(obj)
    return kind.__name__ in ("RandomState", "Generator") and kind.__module__.startswith(
        "numpy.random"
    )


def _draw(obj):
    if isinstance(obj, _random.Random):
        return repr(obj.random())
    return obj.bytes(16).hex()


def _global_names():
    """`{id: "module.name"}` of every module's globals."""
    names = {}
    for module_name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            for name, value in list(namespace.items()):
                names.setdefault(id(value), "%s.%s" % (module_name, name))
    return names


def _describe(obj, names):
    """Where the user finds `obj`: a module global (`handler.rng`), an attribute of one
    (`tempfile._name_sequence._rng`) or of an object of some class, or just its type."""
    if id(obj) in names:
        return names[id(obj)]
    for referrer in gc.get_referrers(obj):
        # An instance refers to its attributes itself, or through a dict of its own.
        owners = gc.get_referrers(referrer) if type(referrer) is dict else (referrer,)
        for owner in owners:
            try:
                namespace = getattr(owner, "__dict__", None)
            except Exception:
                continue  # an object whose attribute lookup fails
            if not isinstance(namespace, dict) or (owner is not referrer and namespace is not referrer):
                continue
            attribute = next((k for k, v in namespace.items() if v is obj), None)
            if attribute is not None:
                where = names.get(id(owner)) or "a %s object at %#x" % (
                    type(owner).__qualname__,
                    id(owner),
                )
                return "%s.%s" % (where, attribute)
    return "a %s object at %#x" % (type(obj).__qualname__, id(obj))


def _ctypes():
    import ctypes

    return ctypes


def _openssl_copies():
    """`(path, library)` of every libcrypto mapped into this process (Python's own, and
    copies bundled with packages), with RAND_add and RAND_bytes declared."""
    ctypes = _ctypes()
    copies = []
    for path in _mapped_libraries():
        if not path.rpartition("/")[2].startswith("libcrypto"):
            continue
        try:
            lib = ctypes.CDLL(path, mode=posix.RTLD_NOLOAD | posix.RTLD_LAZY)
            lib.RAND_add.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_double)
            lib.RAND_add.restype = None
            lib.RAND_bytes.argtypes = (ctypes.c_void_p, ctypes.c_int)
            lib.RAND_bytes.restype = ctypes.c_int
        except (OSError, AttributeError):
            continue  # not loaded after all, or no such symbols (not OpenSSL)
        copies.append((path, lib))
    return copies


def _mapped_libraries():
    """Paths of the shared objects mapped into this process, once each."""
    fd = posix.open("/proc/self/maps", posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = posix.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        posix.close(fd)
    paths = []
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
            if fields[5] not in paths:
                paths.append(fields[5])
    return paths
