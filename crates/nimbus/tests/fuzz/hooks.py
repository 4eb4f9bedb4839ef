"""Schemathesis hooks of the OpenAPI fuzz test (crates/nimbus/tests/openapi_fuzz.rs).

One check, `positive_data_acceptance_within_rules`, replaces schemathesis's
`positive_data_acceptance` (the test runs with --exclude-checks positive_data_acceptance): a
request the document calls valid must not be refused with 400, except where the server
applies a rule that JSON Schema (OpenAPI 3.0) cannot state. Each such rule is listed below
with the error it gives and, where the request shows it, a test that the request really
breaks it; any other 400 to a valid request fails the run, as the built-in check would.
"""

import re

import schemathesis

# Statuses a valid request may get (schemathesis's defaults for positive_data_acceptance).
ACCEPTED = {401, 403, 404, 409, 429}

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def utf8_len(value):
    return len(value.encode("utf-8")) if isinstance(value, str) else 0


def env_vars_break_rules(case):
    """Names must be identifiers without the NIMBUS_ prefix (no propertyNames in OpenAPI
    3.0); values are limited in bytes, maxLength counts characters."""
    env = case.body.get("env_vars") if isinstance(case.body, dict) else None
    if not isinstance(env, dict):
        return False
    return any(
        not ENV_NAME.fullmatch(name) or name.startswith("NIMBUS_") or utf8_len(value) > 4096
        for name, value in env.items()
    )


def session_keys_too_long(case):
    """Session keys are 1-256 bytes; maxLength counts characters."""
    given = [
        (case.query or {}).get("session_key"),
        (case.headers or {}).get("X-Nimbus-Session-Key"),
        (case.path_parameters or {}).get("key"),
        (case.path_parameters or {}).get("session_key"),
    ]
    return any(utf8_len(k) > 256 for k in given)


def session_keys_differ(case):
    """A session key given both as session_key and in the header must be the same one: a
    rule across two parameters."""
    query = (case.query or {}).get("session_key")
    header = (case.headers or {}).get("X-Nimbus-Session-Key")
    return bool(query) and bool(header) and query != header.strip()


def state_key_too_long(case):
    """State keys are 1-256 bytes; maxLength counts characters."""
    return utf8_len((case.query or {}).get("key")) > 256


def always(_case):
    return True


def code_given_twice(case):
    """Not a rule of the server's but of the fuzzer's: a dictionary value put into `code`
    next to a drawn `code_archive` breaks the document's oneOf, which the case then still
    counts as valid."""
    body = case.body if isinstance(case.body, dict) else {}
    return isinstance(body.get("code"), str) and isinstance(body.get("code_archive"), str)


# A function's code is only known to load once it has loaded; an archive only to unpack once
# unpacked; a handler to exist once the bundle is read.
CODE_RULES = [
    ("function_init_failed", None, always),
    ("validation_error", "code_archive", always),
    ("validation_error", "handler", always),
    ("validation_error", "env_vars", env_vars_break_rules),
    ("invalid_request", None, code_given_twice),
]
# Weights must sum to 100 over distinct versions that exist: no JSON Schema keyword sums
# or compares array items by one field, and existence is the store's to know.
ROUTING_RULES = [("validation_error", "routing_config.weights", always)]
SESSION_RULES = [("validation_error", "session_key", session_keys_too_long)]
INVOKE_RULES = SESSION_RULES + [("invalid_request", None, session_keys_differ)]

# operationId -> [(error code, error field or None, test of the request)]
RULES = {
    "createFunction": CODE_RULES,
    "updateFunction": CODE_RULES,
    "createAlias": ROUTING_RULES,
    "updateAlias": ROUTING_RULES,
    # The alias to move, and the version to roll back to, must exist.
    "publishVersion": [("validation_error", "publish_alias", always)],
    "rollbackAlias": [("validation_error", "to_version", always)],
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
    operation_id = case.operation.definition.raw.get("operationId")
    return any(
        error.get("code") == code and (field is None or error.get("field") == field) and applies(case)
        for code, field, applies in RULES.get(operation_id, [])
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
