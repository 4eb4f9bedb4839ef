"""Fresh randomness in instances forked from a template (SPEC §6), and the check that it is.

Every instance forked from one template (or from a template restored from its checkpoint)
starts with a copy of the template's memory, generators' states included. Each is PID 1 of
its own pid namespace, so a library that detects a fork by a change of `getpid()` — OpenSSL
3 does — sees none. Imported by nimbus_worker in a template, before the template's memory
is frozen, so that every instance shares this module's pages.

- `prepare()` runs once in the template, when the function's code is loaded: it finds the
  OpenSSL copies mapped in the process and every random generator object on the heap
  (`random.Random` and NumPy's, the function's own included).
- `reseed()` runs in every new instance before the function's code runs again: Python's
  `random` (its module instance), `tempfile`'s name sequence, the `ssl` module's OpenSSL
  and every OpenSSL copy loaded in the process (`RAND_add` of fresh kernel entropy: the next
  draw of each thread's generator reseeds from it), NumPy's legacy global generator.
- `fingerprints()` does not trust that list: in a probe instance (see nimbus_fork's
  `probe`) it draws once from every generator `prepare` found and from the OpenSSL copies,
  and `same(first, second)` names those that gave two probes the same output. The probes
  only read the generators, so they copy little of the template's memory however large.
"""

import _random
import gc
import posix
import sys

# Bytes of kernel entropy mixed into each OpenSSL copy.
_SEED_BYTES = 48
# The OpenSSL copies of the template, found once by `prepare` (instances inherit them).
_copies = ()
# The generator objects on the template's heap when `prepare` ran, but those meant to repeat.
_generators = ()


def prepare(skip=()):
    """In the template, once the function's code is loaded: finds what `reseed` reseeds in
    every instance and what the probes compare. `skip` holds generators meant to repeat."""
    global _copies, _generators
    _copies = [lib for _path, lib in _openssl_copies()]
    # OpenSSL seeds its generators at their first use. Used here, in the template, a
    # reseed in each instance is cheap (about 0.2 ms); left to the instances, the reseed
    # would seed them there from scratch, every time (about 1.4 ms).
    for lib in _copies:
        lib.RAND_bytes((_ctypes().c_ubyte * 1)(), 1)
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        ssl.RAND_bytes(1)
    skipped = {id(obj) for obj in skip}
    _generators = tuple(
        obj for obj in gc.get_objects() if _is_generator(obj) and id(obj) not in skipped
    )


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
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        # The OpenSSL `ssl` uses, even linked into the interpreter (no libcrypto to find).
        ssl.RAND_add(posix.urandom(_SEED_BYTES), float(_SEED_BYTES))
    for lib in _copies:
        seed = posix.urandom(_SEED_BYTES)
        lib.RAND_add(seed, len(seed), float(len(seed)))
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def fingerprints():
    """`{key: output}` of every generator `prepare` found and of the OpenSSL copies, each
    drawn once (the process is a probe, thrown away after). A generator's key is its
    address, the same in every fork of the template; `same` turns keys into names."""
    out = {}
    for obj in _generators:
        try:
            out["%#x" % id(obj)] = _draw(obj)
        except Exception:
            pass  # a generator that cannot draw has no output to compare
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        out["tempfile names"] = next(tempfile._get_candidate_names())
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        out["ssl.RAND_bytes"] = ssl.RAND_bytes(16).hex()
    for path, lib in _openssl_copies():
        buffer = (_ctypes().c_ubyte * 16)()
        if lib.RAND_bytes(buffer, 16) == 1:
            out["OpenSSL RAND_bytes (%s)" % path.rpartition("/")[2]] = bytes(buffer).hex()
    return out


def same(first, second):
    """The names of the generators that gave the two probes' `fingerprints` the same output
    (in the template: where each generator lives, looked up only for these)."""
    keys = [key for key in first if key in second and first[key] == second[key]]
    by_key = {"%#x" % id(obj): obj for obj in _generators}
    names = _global_names() if any(key in by_key for key in keys) else {}
    return [_describe(by_key[key], names) if key in by_key else key for key in keys]


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
