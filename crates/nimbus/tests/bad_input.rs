//! Bad input at the door: what a user or an attacker can send that the server must refuse
//! with a 4xx in the API's error shape, before it reaches an instance, a 5xx or a huge
//! answer. The real `nimbus` binary as a server, driven over HTTP.

use std::io::Write;

use base64::Engine as _;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

use nimbus_testkit::server::{code_of, Backend, Nimbus, Server};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

/// One request as given (the path is taken as is, percent escapes included): status,
/// headers and body.
async fn send(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = s
        .http
        .request(method.parse().unwrap(), format!("{}{path}", s.base));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(body) = body {
        req = req.body(body);
    }
    let resp = s.auth(req).send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

/// The error code of an answer that must be a JSON error: its content type and shape are
/// checked too.
fn json_error_code(what: &str, headers: &HeaderMap, body: &[u8]) -> String {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "{what}: content type {content_type:?}, body {:?}",
        String::from_utf8_lossy(body)
    );
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let message = value["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no message in {value}");
    code_of(&value).to_owned()
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

const ECHO_PY: &str = "def handle(event):\n    return event\n";
const ECHO_JS: &str = "exports.handle = async (event) => event;\n";

#[tokio::test]
async fn deeply_nested_json_is_refused_before_it_reaches_an_instance() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("echo-py", ECHO_PY, json!({})).await;
    s.deploy("echo-js", ECHO_JS, json!({"runtime": "nodejs20"}))
        .await;
    for function in ["echo-py", "echo-js"] {
        // At the limit: served, and echoed back whole.
        for event in [nested(100), nested_objects(100)] {
            let (status, r) = s.invoke_raw(function, "", &event).await;
            assert_eq!(status, StatusCode::OK, "{function}: {r}");
            let expected: Value = serde_json::from_str(&event).unwrap();
            assert_eq!(r["body"], expected, "{function}");
        }
        let (_, warm) = s.invoke_raw(function, "", "[]").await;
        // Past it, however deep: refused at the door, the instance never sees it.
        for event in [
            nested(101),
            nested_objects(101),
            nested(100_000),
            nested(3_000_000),
            format!(r#"{{"s": "[[[[", "deep": {}}}"#, nested(100)),
        ] {
            for endpoint in ["invoke", "async"] {
                let (status, headers, body) = send(
                    &s,
                    "POST",
                    &format!("/api/v1/functions/{function}/{endpoint}"),
                    Some(event.clone().into_bytes()),
                    &[],
                )
                .await;
                let what = format!("{function} {endpoint} ({} bytes)", event.len());
                assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
                assert_eq!(json_error_code(&what, &headers, &body), "invalid_json");
            }
        }
        let (status, after) = s.invoke_raw(function, "", "[]").await;
        assert_eq!(status, StatusCode::OK, "{after}");
        assert_eq!(after["start_type"], "warm", "{function}: {after}");
        assert_eq!(after["instance_id"], warm["instance_id"], "{function}");
    }
    // The record of an event at the limit reads back as JSON.
    let (_, r) = s.invoke_raw("echo-py", "", &nested(100)).await;
    let id = r["request_id"].as_str().unwrap();
    let (status, record) = s.call("GET", &format!("/invocations/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(record["input"].is_array(), "{record}");

    // Management bodies are held to the same depth.
    let deep_config = json!({"name": "deep", "code": ECHO_PY})
        .to_string()
        .replacen(
            '{',
            &format!(r#"{{"state_config": {},"#, nested(100_000)),
            1,
        );
    let (status, headers, body) = send(
        &s,
        "POST",
        "/api/v1/functions",
        Some(deep_config.into_bytes()),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        json_error_code("deep management body", &headers, &body),
        "invalid_request"
    );
    assert!(String::from_utf8_lossy(&body).contains("more than 100 levels"));
}

/// Method, path, body, headers; the status and code expected.
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a [u8]>,
    &'a [(&'a str, &'a str)],
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn every_error_of_the_http_layer_is_json_with_a_stable_code() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("f", ECHO_PY, json!({})).await;
    let json = [("content-type", "application/json")];
    let over_event_limit = format!("\"{}\"", "a".repeat(6 * 1024 * 1024 + 1)).into_bytes();
    #[rustfmt::skip]
    let cases: &[Case] = &[
        // Path segments that are not UTF-8 once percent-decoded, on routes of each shape.
        ("GET", "/api/v1/functions/%ff", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("DELETE", "/api/v1/functions/%c3%28", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("GET", "/api/v1/functions/f/versions/%ff", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("GET", "/api/v1/functions/f/aliases/%ff/history", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("POST", "/api/v1/functions/%ff/invoke", Some(b"{}"), &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("GET", "/api/v1/functions/f/state/%ff", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("GET", "/api/v1/invocations/%80", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        // A method the route does not take, on the API and on the operational endpoints.
        ("PATCH", "/api/v1/functions", None, &[], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("PUT", "/api/v1/functions/f/invoke", None, &[], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("DELETE", "/health", None, &[], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("POST", "/metrics", None, &[], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        // Routes that do not exist.
        ("GET", "/api/v1/nope", None, &[], StatusCode::NOT_FOUND, "route_not_found"),
        ("GET", "/api/v2/functions", None, &[], StatusCode::NOT_FOUND, "route_not_found"),
        ("GET", "/nope", None, &[], StatusCode::NOT_FOUND, "route_not_found"),
        // Query strings and bodies the endpoint cannot read.
        ("GET", "/api/v1/functions?limit=abc", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("GET", "/api/v1/functions/f/sessions?limit=1&bogus=2", None, &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("POST", "/api/v1/functions/f/invoke?version=x", Some(b"{}"), &[], StatusCode::BAD_REQUEST, "invalid_request"),
        ("POST", "/api/v1/functions", Some(b"{not json"), &json, StatusCode::BAD_REQUEST, "invalid_request"),
        ("POST", "/api/v1/functions/f/invoke", Some(b"{not json"), &json, StatusCode::BAD_REQUEST, "invalid_json"),
        ("POST", "/api/v1/functions/f/invoke", Some(b"\xff\xfe"), &json, StatusCode::BAD_REQUEST, "invalid_json"),
        ("POST", "/api/v1/functions/f/invoke", Some(&over_event_limit), &json, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("POST", "/api/v1/functions/f/invoke", Some(b"{}"), &[("x-nimbus-session-key", "a\tb")], StatusCode::BAD_REQUEST, "validation_error"),
    ];
    for (method, path, body, headers, status, code) in cases {
        let what = format!("{method} {path}");
        let (got, answer_headers, answer) =
            send(&s, method, path, body.map(<[u8]>::to_vec), headers).await;
        assert_eq!(got, *status, "{what}: {}", String::from_utf8_lossy(&answer));
        assert_eq!(
            json_error_code(&what, &answer_headers, &answer),
            *code,
            "{what}"
        );
    }
    // The content type of a body is not checked: JSON is read as JSON whatever it says.
    let body = json!({"name": "typed", "code": ECHO_PY})
        .to_string()
        .into_bytes();
    let (status, _, answer) = send(
        &s,
        "POST",
        "/api/v1/functions",
        Some(body),
        &[("content-type", "text/plain")],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn arrays_are_refused_wherever_an_object_is_expected() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("f", ECHO_PY, json!({})).await;
    let (status, alias) = s
        .call(
            "POST",
            "/functions/f/aliases",
            Some(json!({"name": "a", "routing_config": {"weights": [{"version": 1, "weight": 100}]}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{alias}");
    let weights = json!([{"version": 1, "weight": 100}]);
    // Every endpoint that takes a JSON object, with the array serde would read as that
    // object's fields in order, and with arrays where a nested object belongs.
    let cases: Vec<(&str, &str, Value)> = vec![
        ("POST", "/functions", json!(["g", "", null, null, ECHO_PY])),
        ("POST", "/functions", json!([])),
        (
            "POST",
            "/functions",
            json!({"name": "g", "code": ECHO_PY, "state_config": [true]}),
        ),
        ("PUT", "/functions/f", json!(["changed"])),
        ("PUT", "/functions/f", json!({"state_config": [true, 0]})),
        ("POST", "/functions/f/versions", json!(["changed"])),
        (
            "POST",
            "/functions/f/aliases",
            json!(["b", "", {"weights": weights}]),
        ),
        (
            "POST",
            "/functions/f/aliases",
            json!({"name": "b", "routing_config": [weights]}),
        ),
        (
            "POST",
            "/functions/f/aliases",
            json!({"name": "b", "routing_config": {"weights": [[1, 100]]}}),
        ),
        (
            "PUT",
            "/functions/f/aliases/a",
            json!([{"weights": [{"version": 1, "weight": 100}]}, "x"]),
        ),
        (
            "PUT",
            "/functions/f/aliases/a",
            json!({"routing_config": {"weights": [[1, 100]]}}),
        ),
        ("POST", "/functions/f/aliases/a/rollback", json!([1])),
        ("POST", "/functions/f/snapshots", json!([1, true])),
    ];
    for (method, path, body) in &cases {
        let (status, answer) = s.call(method, path, Some(body.clone())).await;
        assert_eq!(
            (status, code_of(&answer)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{method} {path} {body}: {answer}"
        );
    }
    // Nothing was made or changed.
    let (status, _) = s.call("GET", "/functions/g", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, f) = s.call("GET", "/functions/f", None).await;
    assert_eq!(
        (f["latest_version"].clone(), f["description"].clone()),
        (json!(1), json!(""))
    );
    let (_, a) = s.call("GET", "/functions/f/aliases/a", None).await;
    assert_eq!(a["revision"], 1, "{a}");
    let (status, _) = s.call("GET", "/functions/f/aliases/b", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn errors_repeat_long_inputs_only_as_a_short_prefix() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("f", ECHO_PY, json!({"state_config": {"enabled": true}}))
        .await;
    // 10 KB in bodies; 4 KB in paths, queries and headers (well within what a server takes
    // of a URL or a header, and still 60 times what an error may repeat).
    let body_input = "x".repeat(10 * 1024);
    let url_input = "x".repeat(4 * 1024);
    let deploy = |extra: Value| {
        let mut body = json!({"name": "ok", "code": ECHO_PY});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let mut long_key = serde_json::Map::new();
    long_key.insert(body_input.clone(), json!(1));
    let mut long_env = serde_json::Map::new();
    long_env.insert(body_input.clone(), json!("v"));
    let long_name_zip =
        nimbus_testkit::server::zip_base64(&[(&format!("{}.py", "n".repeat(4000)), "x = 1\n")]);
    let bodies: Vec<(&str, String, Value)> = vec![
        (
            "POST",
            "/functions".into(),
            json!({"name": body_input, "code": ECHO_PY}),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(json!({"handler": body_input})),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(json!({"handler": format!("a.{body_input}")})),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(json!({"runtime": body_input})),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(json!({"network": body_input})),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(json!({"memory_mb": body_input})),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(Value::Object(long_key.clone())),
        ),
        (
            "POST",
            "/functions".into(),
            deploy(json!({"env_vars": long_env})),
        ),
        (
            "POST",
            "/functions".into(),
            json!({"name": "ok", "code_archive": long_name_zip}),
        ),
        (
            "POST",
            "/functions/f/aliases".into(),
            json!({"name": body_input, "routing_config": {"weights": [{"version": 1, "weight": 100}]}}),
        ),
        (
            "POST",
            "/functions/f/versions".into(),
            json!({"publish_alias": body_input}),
        ),
        ("PUT", "/functions/f".into(), json!({"runtime": body_input})),
    ];
    let urls: Vec<(&str, String)> = vec![
        ("GET", format!("/functions/{url_input}")),
        ("GET", format!("/functions/f/aliases/{url_input}")),
        ("GET", format!("/functions/f/aliases/{url_input}/history")),
        ("POST", format!("/functions/f/aliases/{url_input}/rollback")),
        ("DELETE", format!("/functions/f/aliases/{url_input}")),
        ("GET", format!("/functions/f/versions/{url_input}")),
        ("GET", format!("/functions/f/sessions/{url_input}")),
        ("GET", format!("/functions/f/state/{url_input}")),
        (
            "DELETE",
            format!("/functions/f/state/_global?key={}", "k".repeat(200)),
        ),
        ("GET", format!("/invocations/{url_input}")),
        ("DELETE", format!("/functions/f/snapshots/{url_input}")),
        ("GET", format!("/functions?limit={}", "9".repeat(4096))),
        ("GET", format!("/functions/f/sessions?{url_input}=1")),
        (
            "POST",
            format!("/functions/f/invoke?session_key={url_input}"),
        ),
        ("POST", format!("/functions/f/invoke?alias={url_input}")),
    ];
    let mut answers = Vec::new();
    for (method, path, body) in bodies {
        let what = format!("{method} {path} {}", &body.to_string()[..60]);
        answers.push((what, s.call(method, &path, Some(body)).await));
    }
    for (method, path) in urls {
        let what = format!("{method} {}", &path[..40]);
        answers.push((what, s.call(method, &path, None).await));
    }
    let (status, _, body) = send(
        &s,
        "POST",
        "/api/v1/functions/f/invoke",
        Some(b"{}".to_vec()),
        &[("x-nimbus-session-key", &url_input)],
    )
    .await;
    answers.push((
        "session key header".into(),
        (status, serde_json::from_slice(&body).unwrap()),
    ));
    for (what, (status, answer)) in answers {
        assert!(status.is_client_error(), "{what}: {status} {answer}");
        let size = answer.to_string().len();
        let start: String = answer.to_string().chars().take(300).collect();
        assert!(size < 600, "{what}: a {size}-byte answer: {start}…");
        assert!(!code_of(&answer).is_empty(), "{what}: {answer}");
    }
}

#[tokio::test]
async fn keys_are_checked_before_routing_and_the_scheme_in_any_case() {
    let s = NIMBUS
        .start_with(Backend::Sqlite, "", &["--api-key", "ci:s3cret"])
        .await;
    let plain = reqwest::Client::new();
    // Without a valid key nothing tells which routes or methods exist.
    for key in [
        None,
        Some("Bearer nope"),
        Some("Bearer s3cre"),
        Some("Bearer s3cret0"),
    ] {
        for (method, path) in [
            ("GET", "/api/v1/nope"),
            ("GET", "/api/v1/functions/x/nope"),
            ("PATCH", "/api/v1/functions"),
            ("DELETE", "/api/v1/openapi.json"),
            ("GET", "/nope"),
            ("GET", "/metrics"),
        ] {
            let mut req = plain.request(method.parse().unwrap(), format!("{}{path}", s.base));
            if let Some(key) = key {
                req = req.header("authorization", key);
            }
            let r = req.send().await.unwrap();
            let what = format!("{method} {path} with {key:?}");
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
            assert!(r.headers().get("allow").is_none(), "{what}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(code_of(&body), "unauthorized", "{what}");
        }
    }
    // `/health` and `/ready` stay open.
    for path in ["/health", "/ready"] {
        let r = plain.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // The scheme is case-insensitive (RFC 7235).
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = plain
            .get(format!("{}/api/v1/functions", s.base))
            .header("authorization", format!("{scheme} s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{scheme}");
    }
    // With the key, routing answers as usual.
    let (status, body) = s.call("GET", "/nope", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "route_not_found")
    );
    let (status, body) = s.call("PATCH", "/functions", None).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

fn tar_gz_base64(files: &[(&str, &str)]) -> String {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, body.as_bytes()).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap())
}

#[tokio::test]
async fn archives_the_server_cannot_unpack_are_refused_naming_the_entry() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let handler = "def handle(event):\n    return 'ok'\n";
    let long_name = format!("{}.py", "n".repeat(300));
    let long_path = format!("{}/x.py", vec!["d".repeat(250); 6].join("/"));
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("handler.py", handler), ("lib", "file"), ("lib/x.py", "")],
            "\"lib\"",
        ),
        (
            vec![("handler.py", handler), ("lib/x.py", ""), ("lib", "file")],
            "\"lib\"",
        ),
        (
            vec![("handler.py", handler), (&long_name, "")],
            "names are at most 255 bytes",
        ),
        (
            vec![("handler.py", handler), (&long_path, "")],
            "paths are at most 1024 bytes",
        ),
    ];
    for (files, needle) in &cases {
        for (format, archive) in [
            ("zip", nimbus_testkit::server::zip_base64(files)),
            ("tar.gz", tar_gz_base64(files)),
        ] {
            let (status, answer) = s
                .call(
                    "POST",
                    "/functions",
                    Some(json!({"name": "arch", "code_archive": archive})),
                )
                .await;
            let what = format!(
                "{format} of {:?}",
                files
                    .iter()
                    .map(|f| &f.0[..f.0.len().min(20)])
                    .collect::<Vec<_>>()
            );
            assert_eq!(
                (status, code_of(&answer)),
                (StatusCode::BAD_REQUEST, "validation_error"),
                "{what}: {answer}"
            );
            assert_eq!(answer["error"]["field"], "code_archive", "{what}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(needle), "{what}: {message}");
            assert!(message.len() < 400, "{what}: {message}");
        }
    }
    let (status, _) = s.call("GET", "/functions/arch", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing half-made is kept");
    // Names that differ only in case are two files, both unpacked.
    let files = [
        (
            "handler.py",
            "import Lib, lib\ndef handle(event):\n    return [Lib.X, lib.X]\n",
        ),
        ("Lib.py", "X = 'upper'\n"),
        ("lib.py", "X = 'lower'\n"),
    ];
    let (status, answer) = s
        .call(
            "POST",
            "/functions",
            Some(json!({"name": "cases", "code_archive": nimbus_testkit::server::zip_base64(&files)})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, r) = s.invoke_raw("cases", "", "{}").await;
    assert_eq!(
        (status, r["body"].clone()),
        (StatusCode::OK, json!(["upper", "lower"])),
        "{r}"
    );
}

#[tokio::test]
async fn aliases_are_bounded_per_function_and_listed_in_pages() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    s.deploy("f", ECHO_PY, json!({})).await;
    let routing = json!({"weights": [{"version": 1, "weight": 100}]});
    // `latest` and 99 more: the limit.
    for i in 1..100 {
        let (status, answer) = s
            .call(
                "POST",
                "/functions/f/aliases",
                Some(json!({"name": format!("a{i:03}"), "routing_config": routing})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{i}: {answer}");
    }
    let (status, answer) = s
        .call(
            "POST",
            "/functions/f/aliases",
            Some(json!({"name": "one-more", "routing_config": routing})),
        )
        .await;
    assert_eq!(
        (status, code_of(&answer)),
        (StatusCode::CONFLICT, "too_many_aliases"),
        "{answer}"
    );
    // Pages like the versions list: 20 by default, `limit` and `offset`, with the total.
    let (_, first) = s.call("GET", "/functions/f/aliases", None).await;
    assert_eq!(first["aliases"].as_array().unwrap().len(), 20, "{first}");
    assert_eq!(
        (first["total"].clone(), first["limit"].clone()),
        (json!(100), json!(20))
    );
    let (_, last) = s
        .call("GET", "/functions/f/aliases?limit=30&offset=90", None)
        .await;
    let names: Vec<&str> = last["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 10);
    assert_eq!((names[0], names[9]), ("a091", "latest"));
    // The CLI lists them all, page after page.
    let listed = s.cli(&["alias", "list", "f"]).await;
    let rows = listed
        .lines()
        .filter(|l| l.starts_with('a') || l.starts_with("latest"));
    assert_eq!(rows.count(), 100, "{listed}");
    let json_list: Value =
        serde_json::from_str(&s.cli(&["alias", "list", "f", "--output", "json"]).await).unwrap();
    assert_eq!(json_list["aliases"].as_array().unwrap().len(), 100);
    // Deleting one makes room again.
    let (status, _) = s.call("DELETE", "/functions/f/aliases/a001", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = s
        .call(
            "POST",
            "/functions/f/aliases",
            Some(json!({"name": "one-more", "routing_config": routing})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

#[tokio::test]
async fn errors_show_paths_in_the_sandbox_not_the_data_directory() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let data_dir = s.dir.path().canonicalize().unwrap();
    let data_dir = data_dir.to_str().unwrap();
    let python = "def handle(event):\n    raise ValueError('bad ' + __file__)\n";
    let node = "exports.handle = () => { throw new Error(`bad ${__filename}`); };\n";
    s.deploy("py", python, json!({})).await;
    s.deploy("js", node, json!({"runtime": "nodejs20"})).await;
    for (function, file) in [("py", "handler.py"), ("js", "handler.js")] {
        let (status, r) = s.invoke_raw(function, "", "{}").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.ends_with(&format!("bad {file}")), "{r}");
        let traceback = r["error"]["traceback"].as_str().unwrap();
        assert!(traceback.contains(file), "{traceback}");
        assert!(!r.to_string().contains(data_dir), "{function}: {r}");
    }
    // A deploy whose code fails to load says so without the data directory either.
    let (status, r) = s
        .call(
            "POST",
            "/functions",
            Some(json!({"name": "broken", "code": "raise RuntimeError('no config next to ' + __file__)\n"})),
        )
        .await;
    assert_eq!(
        (status, code_of(&r)),
        (StatusCode::BAD_REQUEST, "function_init_failed"),
        "{r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("no config next to handler.py"),
        "{r}"
    );
    assert!(!r.to_string().contains(data_dir), "{r}");
}

#[tokio::test]
async fn a_handler_module_shadowing_the_standard_library_is_refused_at_deploy() {
    let s = NIMBUS.start(Backend::Sqlite).await;
    let cases = [
        (
            "os.system",
            vec![("os.py", "def system(event):\n    return 'mine'\n")],
            "os",
        ),
        (
            "json.loads",
            vec![("json.py", "def loads(event):\n    return 1\n")],
            "json",
        ),
        (
            "email.handler.handle",
            vec![
                ("email/__init__.py", ""),
                ("email/handler.py", "def handle(event):\n    return 1\n"),
            ],
            "email",
        ),
    ];
    for (handler, files, module) in cases {
        let (status, r) = s
            .call(
                "POST",
                "/functions",
                Some(json!({"name": "shadow", "handler": handler, "code_archive": nimbus_testkit::server::zip_base64(&files)})),
            )
            .await;
        assert_eq!(
            (status, code_of(&r)),
            (StatusCode::BAD_REQUEST, "function_init_failed"),
            "{handler}: {r}"
        );
        let message = r["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!(
                "'{module}' is the name of a standard-library module"
            )),
            "{handler}: {message}"
        );
    }
    let (status, _) = s.call("GET", "/functions/shadow", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
