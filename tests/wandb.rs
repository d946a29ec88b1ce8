//! Weights & Biases logging against a stub W&B server on 127.0.0.1 (no outside server is reachable here):
//! the run is created with the resolved recipe as config and the key as basic auth, the streamed history
//! equals metrics.jsonl line for line with advancing offsets, the run is marked complete, a resumed run
//! continues the same W&B run; a failing, hanging or absent server costs one warning line and nothing else;
//! without a key (or with W&B switched off) nothing is sent.

mod common;

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `[run]` and `[[stage]]` tables after [`common::TINY_MODEL`].
const REST: &str = r#"

[run]
seed = 3
threads = 1
log_every = 1
save_every = 3

[[stage]]
kind = "sft"
name = "sft"
synthetic = { count = 16, arithmetic = { seed = 5 } }
tokenize = { max_length = 96 }
max_steps = 6
batch_size = 2
lr = 2e-3
"#;

fn recipe() -> String {
    common::tiny_recipe(REST)
}

/// `api:test-key-123` in base64.
const AUTH: &str = "Basic YXBpOnRlc3Qta2V5LTEyMw==";

#[derive(Clone, Debug)]
struct Req {
    path: String,
    auth: String,
    body: Value,
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Ok,
    /// GraphQL works, every file_stream post answers 500.
    StreamFails,
    /// Accepts connections and never answers.
    Hangs,
}

struct Stub {
    url: String,
    reqs: Arc<Mutex<Vec<Req>>>,
}

/// A minimal HTTP/1.1 server: one request per connection, JSON bodies with Content-Length.
fn stub(behaviour: Behaviour) -> Stub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let reqs: Arc<Mutex<Vec<Req>>> = Arc::default();
    let lines: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let r = reqs.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (r, lines) = (r.clone(), lines.clone());
            std::thread::spawn(move || serve(conn, behaviour, &r, &lines));
        }
    });
    Stub { url, reqs }
}

fn serve(conn: TcpStream, behaviour: Behaviour, reqs: &Mutex<Vec<Req>>, lines: &Mutex<HashMap<String, u64>>) {
    let mut rd = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if rd.read_line(&mut first).is_err() {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut len, mut auth) = (0usize, String::new());
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().unwrap(),
            "authorization" => auth = v.trim().to_string(),
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    reqs.lock().unwrap().push(Req { path: path.clone(), auth, body: body.clone() });
    if behaviour == Behaviour::Hangs {
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let (status, reply) = if path == "/graphql" {
        // the run as the W&B server answers it; historyLineCount: lines already streamed to this run
        let v = &body["variables"];
        let name = v["name"].as_str().unwrap_or("").to_string();
        let count = *lines.lock().unwrap().get(&name).unwrap_or(&0);
        let entity = v["entity"].as_str().unwrap_or("default-entity");
        let bucket = serde_json::json!({"id": "UnVuOjE=", "name": name, "displayName": v["displayName"], "historyLineCount": count,
            "project": {"id": "UHJvamVjdDox", "name": v["project"], "entity": {"id": "RW50aXR5OjE=", "name": entity}}});
        ("200 OK", serde_json::json!({"data": {"upsertBucket": {"bucket": bucket, "inserted": count == 0}}}))
    } else if behaviour == Behaviour::StreamFails {
        ("500 Internal Server Error", serde_json::json!({"error": "stub failure"}))
    } else {
        let run = path.split('/').nth(4).unwrap_or("").to_string();
        if let Some(n) = body["files"]["wandb-history.jsonl"]["content"].as_array() {
            *lines.lock().unwrap().entry(run).or_default() += n.len() as u64;
        }
        ("200 OK", serde_json::json!({"exitcode": null, "limits": {}}))
    };
    let text = reply.to_string();
    let mut w = conn;
    let _ = write!(w, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
}

/// `train` with only the given W&B variables set.
fn train(dir: &Path, vars: &[(&str, &str)], extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
    c.args(["--recipe"]).arg(dir.join("recipe.toml")).args(["--output"]).arg(dir.join("out")).args(extra);
    for (k, _) in std::env::vars() {
        if k.starts_with("WANDB_") {
            c.env_remove(k);
        }
    }
    c.env("WHET_WANDB_FLUSH_MS", "0");
    for (k, v) in vars {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn online<'a>(s: &'a Stub) -> Vec<(&'static str, &'a str)> {
    vec![("WANDB_API_KEY", "test-key-123"), ("WANDB_BASE_URL", s.url.as_str()), ("WANDB_PROJECT", "whet-test"), ("WANDB_ENTITY", "team"), ("WANDB_NAME", "demo-run")]
}

fn strip_wandb_keys(v: &Value) -> Value {
    let mut m = v.as_object().unwrap().clone();
    m.retain(|k, _| !k.starts_with('_'));
    Value::Object(m)
}

/// The history rows the stub received, in order, each checked to carry the offset it was sent at.
fn history(reqs: &[Req]) -> Vec<Value> {
    let mut rows = vec![];
    for r in reqs.iter().filter(|r| r.path.ends_with("/file_stream")) {
        let Some(h) = r.body["files"].get("wandb-history.jsonl") else { continue };
        assert_eq!(h["offset"].as_u64().unwrap(), rows.len() as u64, "offset of a history post");
        for l in h["content"].as_array().unwrap() {
            rows.push(serde_json::from_str::<Value>(l.as_str().unwrap()).unwrap());
        }
    }
    rows
}

#[test]
fn runs_stream_config_history_and_completion_to_the_server() {
    let root = tempfile::tempdir().unwrap();
    let s = stub(Behaviour::Ok);
    let d = common::setup(root.path(), "online", &recipe());
    let out = train(&d, &online(&s), &["--set", "stage.0.lr=0.003"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning: W&B"), "{stderr}");
    let reqs = s.reqs.lock().unwrap().clone();
    assert!(reqs.iter().all(|r| r.auth == AUTH), "every request carries basic auth api:<key>");

    // run creation: upsertBucket with project, entity, name, id and the resolved recipe as config
    let create = &reqs[0];
    assert_eq!(create.path, "/graphql");
    assert!(create.body["query"].as_str().unwrap().contains("upsertBucket(input:"));
    let v = &create.body["variables"];
    assert_eq!((v["project"].as_str(), v["entity"].as_str(), v["displayName"].as_str()), (Some("whet-test"), Some("team"), Some("demo-run")));
    let id = v["name"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 8);
    assert_eq!(std::fs::read_to_string(d.join("out/wandb/run-id")).unwrap(), id);
    let config: Value = serde_json::from_str(v["config"].as_str().unwrap()).unwrap();
    let stage = &config["stage"]["value"][0];
    assert_eq!(config["stage"]["desc"], Value::Null);
    assert_eq!(stage["lr"], 0.003, "the --set override");
    assert_eq!(stage["beta2"], 0.999, "a default the recipe does not spell out");
    assert_eq!(config["run"]["value"]["seed"], 3);
    assert_eq!(config["model"]["value"]["config"]["hidden_size"], 32);

    // history: the metrics.jsonl records, in order, numbered by _step, over several posts
    let url = format!("/files/team/whet-test/{id}/file_stream");
    let streams: Vec<&Req> = reqs.iter().filter(|r| r.path != "/graphql").collect();
    assert!(streams.iter().all(|r| r.path == url), "{:?}", streams.iter().map(|r| &r.path).collect::<Vec<_>>());
    let posts = streams.iter().filter(|r| r.body["files"].get("wandb-history.jsonl").is_some()).count();
    assert!(posts >= 2, "history came in {posts} post(s); offsets never advanced");
    let rows = history(&reqs);
    let jsonl = common::metrics(&d);
    assert_eq!(jsonl.len(), 6, "one line per step");
    assert_eq!(rows.iter().map(strip_wandb_keys).collect::<Vec<_>>(), jsonl);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["_step"], i as u64);
        assert!(r["_runtime"].as_f64().unwrap() >= 0.0 && r["_timestamp"].as_f64().unwrap() > 1.6e9);
    }
    let summary = streams.iter().rev().find_map(|r| r.body["files"].get("wandb-summary.json")).unwrap();
    let summary: Value = serde_json::from_str(summary["content"][0].as_str().unwrap()).unwrap();
    assert_eq!(summary["loss"], jsonl.last().unwrap()["loss"]);
    // the end
    assert_eq!(streams.last().unwrap().body, serde_json::json!({"complete": true, "exitcode": 0}));

    // a killed and resumed run continues the same W&B run where its history left off
    let before = s.reqs.lock().unwrap().len();
    let d3 = common::setup(root.path(), "killed", &recipe());
    let mut vars = online(&s);
    vars.push(("WHET_TEST_KILL", "after-ckpt:0:3"));
    assert!(!train(&d3, &vars, &[]).status.success());
    let mid = s.reqs.lock().unwrap().len();
    let out = train(&d3, &online(&s), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = s.reqs.lock().unwrap().clone();
    let first_id = all[before..mid].iter().rev().find(|r| r.path == "/graphql").unwrap().body["variables"]["name"].clone();
    let again = &all[mid];
    assert_eq!(again.path, "/graphql");
    assert_eq!(again.body["variables"]["name"], first_id, "the resumed run keeps its W&B id");
    let sent_before: u64 = all[before..mid]
        .iter()
        .filter(|r| r.path.contains(first_id.as_str().unwrap()))
        .filter_map(|r| r.body["files"]["wandb-history.jsonl"]["content"].as_array().map(|a| a.len() as u64))
        .sum();
    let next = all[mid..].iter().find_map(|r| r.body["files"].get("wandb-history.jsonl")).unwrap();
    assert_eq!(next["offset"].as_u64().unwrap(), sent_before, "history continues at historyLineCount");
}

#[test]
fn a_failing_hanging_or_absent_server_costs_one_warning() {
    let root = tempfile::tempdir().unwrap();
    let failing = stub(Behaviour::StreamFails);
    let hanging = stub(Behaviour::Hangs);
    let absent = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let reference = common::setup(root.path(), "reference", &recipe());
    assert!(train(&reference, &[], &[]).status.success());
    let want = common::metrics(&reference);
    for (name, url) in [("failing", failing.url.as_str()), ("hanging", hanging.url.as_str()), ("absent", absent.as_str())] {
        let d = common::setup(root.path(), name, &recipe());
        let t = Instant::now();
        let out = train(&d, &[("WANDB_API_KEY", "test-key-123"), ("WANDB_BASE_URL", url), ("WANDB_HTTP_TIMEOUT", "1")], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        assert_eq!(stderr.matches("warning: W&B").count(), 1, "{name}: {stderr}");
        assert!(stderr.contains("W&B logging stopped"), "{name}: {stderr}");
        assert!(t.elapsed() < Duration::from_secs(40), "{name}: the server held training up");
        // metrics are unaffected (timings aside)
        let got = common::metrics(&d);
        assert_eq!(got.len(), want.len(), "{name}");
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(a["loss"], b["loss"], "{name}");
        }
        assert!(std::fs::read_dir(d.join("out/tensorboard")).unwrap().count() > 0, "{name}");
    }
    assert!(failing.reqs.lock().unwrap().len() >= 2, "the failing server saw the run and a history post");
}

#[test]
fn nothing_is_sent_without_a_key_or_with_wandb_off() {
    let root = tempfile::tempdir().unwrap();
    let s = stub(Behaviour::Ok);
    let url = s.url.as_str();
    let tb_only = recipe().replace("save_every = 3", "save_every = 3\nreport_to = \"tensorboard\"");
    let cases: [(&str, String, Vec<(&str, &str)>); 3] = [
        ("no-key", recipe(), vec![("WANDB_BASE_URL", url)]),
        ("disabled", recipe(), vec![("WANDB_API_KEY", "k"), ("WANDB_BASE_URL", url), ("WANDB_MODE", "disabled")]),
        ("tensorboard-only", tb_only, vec![("WANDB_API_KEY", "k"), ("WANDB_BASE_URL", url)]),
    ];
    for (name, recipe, vars) in &cases {
        let d = common::setup(root.path(), name, recipe);
        let out = train(&d, vars, &[]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!d.join("out/wandb").exists(), "{name}");
    }
    assert_eq!(s.reqs.lock().unwrap().len(), 0, "requests were sent");

    // offline: the rows are kept on disk, nothing sent
    let d = common::setup(root.path(), "offline", &recipe());
    let out = train(&d, &[("WANDB_BASE_URL", url), ("WANDB_MODE", "offline")], &["--set", "run.report_to=[\"wandb\",\"tensorboard\"]"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = std::fs::read_to_string(d.join("out/wandb/run-id")).unwrap();
    let dir = d.join(format!("out/wandb/offline-run-{id}"));
    let rows: Vec<Value> = std::fs::read_to_string(dir.join("wandb-history.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.iter().map(strip_wandb_keys).collect::<Vec<_>>(), common::metrics(&d));
    assert_eq!(std::fs::read_to_string(dir.join("exitcode")).unwrap(), "0");
    assert_eq!(s.reqs.lock().unwrap().len(), 0, "offline sent requests");

    // a bad destination is a recipe error naming the key
    let d = common::setup(root.path(), "bad", &recipe().replace("save_every = 3", "save_every = 3\nreport_to = [\"wandbb\"]"));
    let out = train(&d, &[], &["--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("report_to: unknown destination \"wandbb\""), "{stderr}");
}
