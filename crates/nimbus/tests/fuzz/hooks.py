"""Schemathesis hooks of the OpenAPI fuzz test (crates/nimbus/tests/openapi_fuzz.rs).

One check, `positive_data_acceptance_within_rules`, replaces schemathesis's
`positive_data_acceptance` (the test runs with --exclude-checks positive_data_acceptance): a
request the document calls valid must not be refused with 400, except where the server
applies a rule that JSON Schema (OpenAPI 3.0) cannot state. Each such rule is listed below
with the error it gives and a test that the request really breaks it; any other 400 to a
valid request, and any of these errors to a request that keeps the rule, fails the run, as
the built-in check would.

Where a rule depends on what the server stores (a version that exists, the code a function
has), the test asks the server with the request's own credentials: a refused request changed
nothing, and schemathesis sends one request at a time, so what it answers now is what the
request met.
"""

import base64
import binascii
import io
import re
import sys
import tarfile
import zipfile
from urllib.parse import quote

import requests
import schemathesis

# Statuses a valid request may get (schemathesis's defaults for positive_data_acceptance).
ACCEPTED = {401, 403, 404, 409, 429}

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def utf8_len(value):
    return len(value.encode("utf-8")) if isinstance(value, str) else 0


def operation_id(case):
    return case.operation.definition.raw.get("operationId")


def body_of(case):
    return case.body if isinstance(case.body, dict) else {}


def function_url(response):
    """`…/api/v1/functions/{id}` of the function the request was about."""
    match = re.match(r"(.*?/api/v1/functions/[^/?#]+)", response.request.url)
    return match.group(1) if match else None


def ask(response, path=""):
    """GET `path` under the function the request was about, with the request's credentials
    (None when it names no function)."""
    url = function_url(response)
    if url is None:
        return None
    auth = response.request.headers.get("Authorization")
    return requests.get(url + path, headers={"Authorization": auth} if auth else {}, timeout=30)


def server_has(response, path):
    """Whether the server stores what `path` names (under the request's function)."""
    answer = ask(response, path)
    return answer is not None and answer.status_code == 200


def stored_function(response):
    answer = ask(response)
    return answer.json() if answer is not None and answer.status_code == 200 else None


def env_vars_break_rules(case, _response):
    """Names must be identifiers without the NIMBUS_ prefix (no propertyNames in OpenAPI
    3.0); values are limited in bytes, maxLength counts characters."""
    env = body_of(case).get("env_vars")
    if not isinstance(env, dict):
        return False
    return any(
        not ENV_NAME.fullmatch(name) or name.startswith("NIMBUS_") or utf8_len(value) > 4096
        for name, value in env.items()
    )


def session_keys_too_long(case, _response):
    """Session keys are 1-256 bytes; maxLength counts characters."""
    given = [
        (case.query or {}).get("session_key"),
        (case.headers or {}).get("X-Nimbus-Session-Key"),
        (case.path_parameters or {}).get("key"),
        (case.path_parameters or {}).get("session_key"),
    ]
    return any(utf8_len(k) > 256 for k in given)


def session_keys_differ(case, _response):
    """A session key given both as session_key and in the header must be the same one: a
    rule across two parameters."""
    query = (case.query or {}).get("session_key")
    header = (case.headers or {}).get("X-Nimbus-Session-Key")
    return bool(query) and bool(header) and query != header.strip()


def state_key_too_long(case, _response):
    """State keys are 1-256 bytes; maxLength counts characters."""
    return utf8_len((case.query or {}).get("key")) > 256


def code_given_twice(case, _response):
    """Not a rule of the server's but of the fuzzer's: a dictionary value put into `code`
    next to a drawn `code_archive` breaks the document's oneOf, which the case then still
    counts as valid."""
    body = body_of(case)
    return isinstance(body.get("code"), str) and isinstance(body.get("code_archive"), str)


# Sources known to load with a handler whose function is `handle`: the fuzzer's dictionary
# value (schemathesis.toml) and the fixtures' (openapi_fuzz.rs), so every function's stored
# code. Any other drawn source is not Python that defines the handler.
LOADABLE_SOURCES = {
    "def handle(event):\n    return event\n",
    "def handle(event, state):\n    state.incr('calls')\n    return event\n",
    "def handle(event, state):\n    state.incr('calls')\n    state.function().incr('calls')\n"
    "    return event\n",
    "def handle(event):\n    raise RuntimeError('fails on purpose')\n",
}
# Top-level modules a Python handler module may not be named after: the standard library's
# (the interpreter of these hooks is the worker's, /usr/bin/python3) and the runtime's.
SHADOWED = set(sys.stdlib_module_names) | {
    "nimbus",
    "nimbus_boot",
    "nimbus_entropy",
    "nimbus_fork",
    "nimbus_worker",
    "__main__",
}


def code_does_not_load(case, _response):
    """The code, new or stored, fails to load: Python source under Node.js, a drawn source,
    a handler function other than the `handle` every stored source defines, or a handler
    module named after a standard-library or runtime module. A stored function's runtime is
    Python and its handler loads (only code that loads is stored)."""
    body = body_of(case)
    if body.get("runtime") not in (None, "python3.11"):
        return True
    code = body.get("code")
    if isinstance(code, str) and code not in LOADABLE_SOURCES:
        return True
    handler = body.get("handler")
    if isinstance(handler, str):
        module, _, function = handler.rpartition(".")
        return function != "handle" or module.partition(".")[0] in SHADOWED
    return False


def archive_files(archive):
    """The regular files of a base64 zip or tar (gzip or not) at safe relative paths, or
    None when it is not one (bad base64, not an archive, a link, an unsafe path)."""
    try:
        data = base64.b64decode(archive.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None

    def safe(name):
        parts = name.split("/")
        return not name.startswith("/") and ".." not in parts and "" not in parts[:-1]

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
            return names if names and all(map(safe, names)) else None
    except Exception:  # anything zipfile raises on drawn bytes
        pass
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            members = t.getmembers()
            if any(m.issym() or m.islnk() for m in members):
                return None
            names = [m.name for m in members if m.isfile()]
            return names if names and all(map(safe, names)) else None
    except Exception:  # anything tarfile raises on drawn bytes
        return None


def archive_unreadable(case, _response):
    """The code archive is not one the server can unpack."""
    archive = body_of(case).get("code_archive")
    return isinstance(archive, str) and archive_files(archive) is None


def module_files(handler, runtime):
    """The files that can hold `handler`'s module (a Node.js module may also be .mjs, .cjs)."""
    stem = handler.rpartition(".")[0].replace(".", "/")
    return [stem + ext for ext in ((".js", ".mjs", ".cjs") if runtime == "nodejs20" else (".py",))]


def handler_not_in_code(case, response):
    """The handler's module file is not in the code: identifiers over 128 characters; an
    archive without it; or, with no code given to an update, the function's stored code,
    which is a single file (the fixtures and every inline deploy are; a drawn archive never
    unpacks): the module file of its stored handler and runtime. Given code is always
    written as the handler's module."""
    body = body_of(case)
    handler = body.get("handler")
    if isinstance(handler, str) and any(len(part) > 128 for part in handler.split(".")):
        return True
    if isinstance(body.get("code"), str):
        return False
    stored = None
    if operation_id(case) == "updateFunction":
        stored = stored_function(response)
        if stored is None:
            return False
    handler = handler or (stored["handler"] if stored else "handler.handle")
    runtime = body.get("runtime") or (stored["runtime"] if stored else "python3.11")
    archive = body.get("code_archive")
    if isinstance(archive, str):
        files = archive_files(archive) or []
    else:
        files = module_files(stored["handler"], stored["runtime"])[:1] if stored else []
    return not any(f in files for f in module_files(handler, runtime))


def weights_break_rules(case, response):
    """Weights must sum to 100 over distinct versions that exist: no JSON Schema keyword
    sums or compares array items by one field, and existence is the store's to know."""
    routing = body_of(case).get("routing_config")
    weights = routing.get("weights") if isinstance(routing, dict) else None
    if not isinstance(weights, list) or not weights:
        return False
    versions = [w.get("version") for w in weights]
    if sum(w.get("weight", 0) for w in weights) != 100 or len(set(versions)) != len(versions):
        return True
    return any(not server_has(response, "/versions/%d" % v) for v in versions)


def publish_alias_missing(case, response):
    """The alias to move to the new version must exist."""
    alias = body_of(case).get("publish_alias")
    return isinstance(alias, str) and not server_has(response, "/aliases/" + quote(alias, safe=""))


def to_version_missing(case, response):
    """The version to roll back to must exist."""
    version = body_of(case).get("to_version")
    return isinstance(version, int) and not server_has(response, "/versions/%d" % version)


CODE_RULES = [
    ("function_init_failed", None, code_does_not_load),
    ("validation_error", "code_archive", archive_unreadable),
    ("validation_error", "handler", handler_not_in_code),
    ("validation_error", "env_vars", env_vars_break_rules),
    ("invalid_request", None, code_given_twice),
]
ROUTING_RULES = [("validation_error", "routing_config.weights", weights_break_rules)]
SESSION_RULES = [("validation_error", "session_key", session_keys_too_long)]
INVOKE_RULES = SESSION_RULES + [("invalid_request", None, session_keys_differ)]

# operationId -> [(error code, error field or None, test of the request and its answer)]
RULES = {
    "createFunction": CODE_RULES,
    "updateFunction": CODE_RULES,
    "createAlias": ROUTING_RULES,
    "updateAlias": ROUTING_RULES,
    "publishVersion": [("validation_error", "publish_alias", publish_alias_missing)],
    "rollbackAlias": [("validation_error", "to_version", to_version_missing)],
    "invokeFunction": INVOKE_RULES,
    "invokeFunctionAsync": INVOKE_RULES,
    "getSession": SESSION_RULES,
    "deleteSession": SESSION_RULES,
    "getState": SESSION_RULES,
    "deleteState": SESSION_RULES + [("key_too_long", None, state_key_too_long)],
}


def allowed_by_rule(case, response):
    try:
        error = response.json()["error"]
    except Exception:
        return False
    return any(
        error.get("code") == code
        and (field is None or error.get("field") == field)
        and applies(case, response)
        for code, field, applies in RULES.get(operation_id(case), [])
    )


@schemathesis.check
def positive_data_acceptance_within_rules(ctx, response, case):
    """A schema-valid request is accepted, or refused only by a rule listed in RULES."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if 200 <= status < 400 or status >= 500 or status in ACCEPTED:
        return None
    if status == 400 and allowed_by_rule(case, response):
        return None
    raise AssertionError(
        f"A schema-valid request was refused with {status}: {response.text[:500]}"
    )
