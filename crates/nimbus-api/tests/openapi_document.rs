//! The OpenAPI document (`openapi.json`, served at `GET /api/v1/openapi.json`) against the
//! router and against itself: every route of `nimbus_api::router` is documented and every
//! documented operation is routed (read from the router's source, so a route added without
//! its documentation fails here); every operation has an operationId, its parameters, its
//! answers with their schemas (errors in the shared `Error` shape), 401 where keys apply,
//! 400 where it parses input and 413 where it reads a body; request bodies refuse unknown
//! fields; every `$ref` resolves and every schema is used. What the server really answers is
//! checked against the document by the fuzz test (`crates/nimbus/tests/openapi_fuzz.rs`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

const DOCUMENT: &str = include_str!("../openapi.json");
const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

/// `(method, path)` of every documented operation, with the operation.
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("a path item") {
            assert!(
                METHODS.contains(&method.as_str()),
                "{path}: {method:?} is not an HTTP method (path-level keys are not used)"
            );
            out.push((method.to_uppercase(), path.clone(), op));
        }
    }
    out
}

/// The schema a `$ref` names.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r}: only component schemas are referenced"));
            let target = &doc["components"]["schemas"][name];
            assert!(target.is_object(), "{r} does not resolve");
            resolve(doc, target)
        }
        None => schema,
    }
}

#[test]
fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let routed = routes_in_source();
    assert!(
        routed.len() > 30,
        "the router's source was not understood: {routed:?}"
    );
    let documented: BTreeSet<(String, String)> = operations(&document())
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from openapi.json: {undocumented:?}; documented but not routed: {unrouted:?}"
    );
}

#[test]
fn the_document_is_openapi_3_0_with_an_id_for_every_operation() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert_eq!(doc["servers"][0]["url"], "/", "paths are absolute");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric())
                && id.starts_with(|c: char| c.is_ascii_lowercase()),
            "{method} {path}: operationId {id:?} is not lowerCamelCase"
        );
        assert!(ids.insert(id), "operationId {id} is used twice");
        assert!(op["summary"].is_string(), "{method} {path} has no summary");
    }
}

#[test]
fn path_parameters_match_the_path_templates() {
    let doc = document();
    for (method, path, op) in operations(&doc) {
        let in_template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        let mut declared = BTreeSet::new();
        for p in op["parameters"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().expect("a parameter has a name");
            assert!(
                ["path", "query", "header"].contains(&p["in"].as_str().unwrap_or_default()),
                "{method} {path}: parameter {name} is in {}",
                p["in"]
            );
            assert!(
                p["schema"].is_object(),
                "{method} {path}: {name} has no schema"
            );
            if p["in"] == "path" {
                assert_eq!(
                    p["required"], true,
                    "{method} {path}: path parameter {name} must be required"
                );
                declared.insert(name);
            }
        }
        assert_eq!(
            in_template, declared,
            "{method} {path}: path parameters declared"
        );
    }
}

#[test]
fn every_answer_has_its_schema_and_errors_share_one_shape() {
    let doc = document();
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], serde_json::json!(["error"]));
    let body = &doc["components"]["schemas"]["ErrorBody"];
    assert_eq!(body["required"], serde_json::json!(["code", "message"]));
    assert!(
        doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .is_some_and(|codes| codes.len() > 30),
        "ErrorCode lists the stable codes"
    );
    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no success answer"
        );
        for (status, response) in responses {
            assert!(
                status.len() == 3 && status.chars().all(|c| c.is_ascii_digit()),
                "{method} {path}: {status} is not a status (no ranges, no default: every status is listed)"
            );
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}: no description"
            );
            if status == "204" {
                assert!(
                    response.get("content").is_none(),
                    "{method} {path}: 204 has no body"
                );
                continue;
            }
            let content = response["content"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path} {status}: no content"));
            for (media, media_type) in content {
                assert!(
                    media_type["schema"].is_object(),
                    "{method} {path} {status} {media}: no schema"
                );
            }
            let schema = &response["content"]["application/json"]["schema"];
            let invocation_failure = op["operationId"] == "invokeFunction"
                && ["500", "502", "504"].contains(&status.as_str());
            if status.starts_with('4') || status.starts_with('5') {
                let expected = if invocation_failure {
                    "InvokeFailure"
                } else {
                    "Error"
                };
                assert_eq!(
                    schema["$ref"],
                    format!("#/components/schemas/{expected}"),
                    "{method} {path} {status}"
                );
            }
        }
    }
}

#[test]
fn statuses_follow_from_what_each_operation_does() {
    let doc = document();
    let open = [("GET", "/health"), ("GET", "/ready")];
    for (method, path, op) in operations(&doc) {
        let has = |status: &str| op["responses"][status].is_object();
        if open.contains(&(method.as_str(), path.as_str())) {
            assert_eq!(op["security"], serde_json::json!([]), "{path} takes no key");
            assert!(!has("401"), "{path} takes no key");
        } else {
            assert!(
                op.get("security").is_none(),
                "{method} {path}: the bearer key applies"
            );
            assert!(has("401"), "{method} {path}: 401 where keys are configured");
        }
        let takes_query = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["in"] == "query");
        if takes_query {
            assert!(has("400"), "{method} {path}: a bad query answers 400");
        }
        if op.get("requestBody").is_some() {
            assert!(has("400"), "{method} {path}: a bad body answers 400");
            assert!(
                has("413"),
                "{method} {path}: a body over its limit answers 413"
            );
        }
        if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
            assert!(has("503"), "{method} {path}: the store can be unreachable");
        }
        // What the HTTP front answers before any route: a head over its limits, a
        // connection over the limit, a body that stops arriving.
        for status in ["414", "431", "503"] {
            assert!(
                has(status),
                "{method} {path}: the front can answer {status}"
            );
        }
        if op.get("requestBody").is_some() {
            assert!(has("408"), "{method} {path}: a stalled body answers 408");
        }
        if has("429") {
            assert!(
                op["responses"]["429"]["headers"]["Retry-After"].is_object(),
                "{method} {path}: a 429 says when to retry"
            );
        }
    }
}

#[test]
fn request_bodies_refuse_unknown_fields_and_name_their_bounds() {
    let doc = document();
    let schemas = &doc["components"]["schemas"];
    for (method, path, op) in operations(&doc) {
        let Some(body) = op.get("requestBody") else {
            continue;
        };
        let schema = resolve(&doc, &body["content"]["application/json"]["schema"]);
        if op["operationId"].as_str().unwrap().starts_with("invoke") {
            assert!(schema.get("type").is_none(), "an event is any JSON value");
            continue;
        }
        assert_eq!(schema["type"], "object", "{method} {path}");
        assert_eq!(
            schema["additionalProperties"], false,
            "{method} {path}: the server refuses unknown fields (serde deny_unknown_fields)"
        );
    }
    for nested in [
        "StateConfigInput",
        "StateConfigPatch",
        "RoutingConfig",
        "WeightedVersion",
    ] {
        assert_eq!(schemas[nested]["additionalProperties"], false, "{nested}");
    }
    let new = &schemas["NewFunction"];
    assert_eq!(new["required"], serde_json::json!(["name"]));
    assert_eq!(
        new["oneOf"],
        serde_json::json!([
            {"required": ["code"], "properties": {"code": {"type": "string"}}},
            {"required": ["code_archive"], "properties": {"code_archive": {"type": "string"}}},
        ]),
        "exactly one of code and code_archive"
    );
    let bounds = |schema: &Value| (schema["minimum"].clone(), schema["maximum"].clone());
    let p = &new["properties"];
    assert_eq!(bounds(&p["memory_mb"]), (64.into(), 4096.into()));
    assert_eq!(bounds(&p["timeout_sec"]), (1.into(), 900.into()));
    assert_eq!(bounds(&p["max_instances"]), (1.into(), 1000.into()));
    assert_eq!(
        bounds(&schemas["WeightedVersion"]["properties"]["weight"]),
        (0.into(), 100.into())
    );
    assert_eq!(
        schemas["FunctionName"]["pattern"],
        "^[a-z0-9][a-z0-9_-]{0,63}$"
    );
    assert_eq!(schemas["FunctionName"]["not"]["pattern"], "^fn_");
    assert_eq!(schemas["AliasName"]["pattern"], "^[a-z][a-z0-9_-]{0,63}$");
    assert_eq!(schemas["Description"]["maxLength"], 1024);
}

#[test]
fn every_reference_resolves_and_every_schema_is_used() {
    let doc = document();
    let mut used = BTreeSet::new();
    for name in DOCUMENT.split("\"#/components/schemas/").skip(1) {
        let name = name.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "#/components/schemas/{name} does not resolve"
        );
        used.insert(name);
    }
    assert!(
        !DOCUMENT.contains("\"$ref\": \"http") && !DOCUMENT.contains("\"$ref\":\"http"),
        "no remote references"
    );
    for name in doc["components"]["schemas"].as_object().unwrap().keys() {
        assert!(used.contains(name.as_str()), "schema {name} is never used");
    }
    // OpenAPI 3.0 ignores whatever stands beside a `$ref`: such keywords would say nothing.
    fn refs_stand_alone(value: &Value, at: &str) {
        match value {
            Value::Object(map) => {
                if map.contains_key("$ref") {
                    assert_eq!(map.len(), 1, "{at}: keywords beside $ref are ignored");
                }
                for (key, child) in map {
                    refs_stand_alone(child, &format!("{at}/{key}"));
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    refs_stand_alone(child, &format!("{at}/{i}"));
                }
            }
            _ => {}
        }
    }
    refs_stand_alone(&doc, "");
}

/// `(METHOD, path)` of every route `nimbus_api::router` declares, read from `src/lib.rs`:
/// each `Router::new()` chain with its `.route(path, method(handler).method(…))` calls, placed
/// under the prefix of the `.nest(prefix, router)` that mounts it.
fn routes_in_source() -> BTreeSet<(String, String)> {
    for entry in std::fs::read_dir(SRC).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // A module's own tests may build routers of their own.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        if path.file_name().unwrap() != "lib.rs" {
            assert!(
                !text.contains(".route(") && !text.contains("Router::new"),
                "{} declares routes: teach routes_in_source to read it",
                path.display()
            );
        }
    }
    routes_in(&std::fs::read_to_string(format!("{SRC}/lib.rs")).unwrap())
}

/// The routes of router-building Rust `source` (see [`routes_in_source`]).
fn routes_in(source: &str) -> BTreeSet<(String, String)> {
    let source = strip_comments(source);
    for unsupported in [".route_service(", ".nest_service("] {
        assert!(
            !source.contains(unsupported),
            "lib.rs uses {unsupported}: teach routes_in_source to read it"
        );
    }
    // Each router chain: its name (`let <name> = Router::new()…;`, or the returned one).
    let mut chains: Vec<(String, &str)> = Vec::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find("Router::new()") {
        let before = rest[..at].trim_end();
        let name = before
            .strip_suffix('=')
            .and_then(|b| {
                b.trim_end()
                    .rsplit(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
            })
            .filter(|n| !n.is_empty())
            .unwrap_or("")
            .to_owned();
        let chain = &rest[at..];
        let end = end_of_expression(chain);
        chains.push((name, &chain[..end]));
        rest = &chain[end..];
    }
    // Where each named router is mounted: under which router, at which prefix.
    let mut mounted: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (parent, chain) in &chains {
        for (call, prefixed) in [(".nest(", true), (".merge(", false)] {
            for args in calls(chain, call) {
                let (prefix, child) = if prefixed {
                    let (prefix, after) = string_literal(args);
                    (prefix, after.trim_start_matches([',', ' ', '\n']).trim())
                } else {
                    (String::new(), args.trim())
                };
                mounted.insert(child.to_owned(), (parent.clone(), prefix));
            }
        }
    }
    let prefix_of = |name: &str| {
        let mut prefix = String::new();
        let mut name = name.to_owned();
        while let Some((parent, p)) = mounted.get(&name) {
            prefix = format!("{p}{prefix}");
            name = parent.clone();
        }
        prefix
    };
    let mut routes = BTreeSet::new();
    for (name, chain) in &chains {
        for args in calls(chain, ".route(") {
            let (path, handlers) = string_literal(args);
            let full = format!("{}{path}", prefix_of(name));
            // `get(handler)`, `.post(handler)`: each name called is a method.
            for (at, _) in handlers.match_indices('(') {
                let called = handlers[..at]
                    .rsplit(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or_default();
                if METHODS.contains(&called) {
                    routes.insert((called.to_uppercase(), full.clone()));
                }
            }
        }
    }
    routes
}

/// `text` without `//` comments (string literals kept whole).
fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut in_string = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '/' && chars.peek() == Some(&'/') {
            for c in chars.by_ref() {
                if c == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// Where the expression starting `text` ends: at a `;` or an unmatched closing bracket.
fn end_of_expression(text: &str) -> usize {
    let mut depth = 0i32;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if in_string {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth == 0 => return i,
            ')' | ']' | '}' => depth -= 1,
            ';' if depth == 0 => return i,
            _ => {}
        }
    }
    text.len()
}

/// The argument text of every `call` (e.g. `.route(`) in `chain`.
fn calls<'a>(chain: &'a str, call: &str) -> Vec<&'a str> {
    chain
        .match_indices(call)
        .map(|(at, _)| {
            let args = &chain[at + call.len()..];
            &args[..end_of_expression(args)]
        })
        .collect()
}

/// The string literal `args` starts with, and what follows it.
fn string_literal(args: &str) -> (String, &str) {
    let args = args.trim_start();
    let body = args
        .strip_prefix('"')
        .unwrap_or_else(|| panic!("expected a string literal: {args}"));
    let end = body.find('"').expect("a closed string literal");
    (body[..end].to_owned(), &body[end + 1..])
}

#[test]
fn the_source_reader_sees_methods_prefixes_and_chains() {
    // The reader itself, on a router written the way lib.rs writes them.
    let routes = routes_in(
        r#"
        let api = Router::new()
            .route("/a", post(x::create).get(x::list)) // .route("/commented", get(y))
            .route(
                "/a/{id}",
                get(x::get).delete(x::delete),
            );
        let protected = Router::new()
            .nest("/api/v1", api)
            .route("/metrics", get(ops::metrics))
            .layer(middleware::from_fn_with_state(keys, auth::require_key));
        Router::new()
            .route("/health", get(ops::health))
            .merge(protected)
            .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no") })
            .with_state(state)
        "#,
    );
    let expected: BTreeSet<(String, String)> = [
        ("POST", "/api/v1/a"),
        ("GET", "/api/v1/a"),
        ("GET", "/api/v1/a/{id}"),
        ("DELETE", "/api/v1/a/{id}"),
        ("GET", "/metrics"),
        ("GET", "/health"),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p.to_owned()))
    .collect();
    assert_eq!(routes, expected);
}

#[test]
fn the_documented_error_codes_are_the_enums() {
    let doc = document();
    let documented: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode lists the codes")
        .iter()
        .map(|c| c.as_str().expect("a code is a string"))
        .collect();
    // Outcomes of a failed invocation are answered in its result, not in the `Error` shape.
    let answered: BTreeSet<&str> = nimbus_core::ErrorCode::ALL
        .iter()
        .filter(|c| !c.is_invocation_outcome())
        .map(|c| c.as_str())
        .collect();
    assert_eq!(documented, answered);
    let invocation = doc["components"]["schemas"]["InvocationError"]["properties"]["code"]
        ["description"]
        .as_str()
        .expect("InvocationError.code is described");
    for code in nimbus_core::ErrorCode::ALL
        .iter()
        .filter(|c| c.is_invocation_outcome())
    {
        assert!(
            invocation.contains(code.as_str()),
            "{code} is not described"
        );
    }
}
