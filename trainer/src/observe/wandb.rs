//! Weights & Biases logging, opt-in: the metrics records of `metrics.jsonl` also go to a W&B run when
//! `WANDB_API_KEY` is set (or `report_to` names "wandb"), spoken over HTTP the way the official client does.
//! Nothing here touches the network otherwise.
//!
//! Wire protocol (from the official client, github.com/wandb/wandb: `wandb/sdk/internal/internal_api.py`
//! `upsert_run`, `wandb/sdk/internal/file_stream.py`, `wandb/sdk/lib/config_util.py`):
//!
//! - every request carries HTTP basic auth with user `api` and the API key as password;
//! - the run is created (or continued, same id) by the GraphQL mutation `upsertBucket` posted to
//!   `<base>/graphql` as `{"query", "variables"}`; `modelName` is the project, `entityName` the entity
//!   (the key's default entity when null), `name` the run id, `displayName` the shown name, and `config` a
//!   JSON string of `{key: {"desc": null, "value": v}}`; the reply names the entity and project the server
//!   used and the run's `historyLineCount` (where a continued run's history goes on);
//! - history rows are streamed to `<base>/files/<entity>/<project>/<run id>/file_stream` as
//!   `{"files": {"wandb-history.jsonl": {"offset": N, "content": [one JSON object per line]}}}`, where N is
//!   the index of the first line sent (the lines already sent), and the run summary as
//!   `"wandb-summary.json": {"offset": 0, "content": [one JSON object]}`; each row carries `_step` (its
//!   index), `_runtime` (seconds since the start) and `_timestamp` (Unix seconds);
//! - with nothing to send for a while, `{"complete": false, "failed": false}` is a heartbeat; the end is
//!   `{"complete": true, "exitcode": N}`.
//!
//! Requests run on a background thread that batches rows (one post per flush interval at most), so a slow
//! or failing server never stalls training: its errors end W&B logging with one warning line, and
//! `metrics.jsonl` and the TensorBoard events are written regardless.
//!
//! Settings follow the W&B client's environment variables: `WANDB_API_KEY`, `WANDB_BASE_URL` (default
//! <https://api.wandb.ai>), `WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_NAME`, `WANDB_RUN_ID`, `WANDB_RUN_GROUP`,
//! `WANDB_TAGS`, `WANDB_MODE` (online, offline, disabled) and `WANDB_HTTP_TIMEOUT` (seconds); recipe keys
//! under `[run]` (`wandb_project`, ...) take precedence over them, as `wandb.init` arguments do.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::settings::{check_run_id, RunSpec};

/// The longest rows wait before they are posted: 2 s (the official client waits 1-5 s), or
/// `WHET_WANDB_FLUSH_MS` (tests post every row to see offsets advance).
fn flush_interval() -> Duration {
    env("WHET_WANDB_FLUSH_MS").and_then(|m| m.parse().ok()).map(Duration::from_millis).unwrap_or(Duration::from_secs(2))
}
/// A heartbeat goes out after this long without a post (the official client's default `heartbeat_seconds`).
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Consecutive failed history posts before giving up.
const MAX_FAILURES: usize = 3;

/// What `report_to` (or its default) asks for.
pub struct Destinations {
    pub tensorboard: bool,
    pub wandb: Option<Settings>,
}

/// Where and how to log to W&B.
#[derive(Debug, Clone)]
pub struct Settings {
    pub base_url: String,
    pub api_key: String,
    pub project: String,
    pub entity: Option<String>,
    pub run_id: String,
    pub display_name: String,
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub offline: bool,
    pub http_timeout: Duration,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// Resolves the destinations from the recipe and the environment. `resuming` reuses the run id saved in
/// `OUTPUT/wandb/run-id` so that a resumed run continues the same W&B run.
pub fn destinations(run: &RunSpec, output: &Path, resuming: bool) -> Result<Destinations> {
    let list = run.report_to.clone();
    let has = |name: &str| list.as_ref().is_some_and(|l| l.iter().any(|x| x == name || x == "all"));
    let tensorboard = list.is_none() || has("tensorboard");
    let explicit = list.as_ref().is_some_and(|l| l.iter().any(|x| x == "wandb"));
    let wanted = match &list {
        None => env("WANDB_API_KEY").is_some(),
        Some(_) => has("wandb"),
    };
    if !wanted {
        return Ok(Destinations { tensorboard, wandb: None });
    }
    let mode = env("WANDB_MODE").unwrap_or_else(|| "online".into());
    let offline = match mode.as_str() {
        "online" | "run" => false,
        "offline" | "dryrun" => true,
        "disabled" => return Ok(Destinations { tensorboard, wandb: None }),
        m => bail!("WANDB_MODE={m}: expected online, offline or disabled"),
    };
    let api_key = env("WANDB_API_KEY").unwrap_or_default();
    if api_key.is_empty() && !offline {
        if explicit {
            eprintln!("warning: report_to names wandb but WANDB_API_KEY is not set: not logging to W&B (WANDB_MODE=offline keeps the rows on disk)");
        }
        return Ok(Destinations { tensorboard, wandb: None });
    }
    let id_file = output.join("wandb").join("run-id");
    let saved = if resuming { std::fs::read_to_string(&id_file).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) } else { None };
    let run_id = match run.wandb_run_id.clone().or_else(|| env("WANDB_RUN_ID")).or(saved) {
        Some(id) => {
            check_run_id(&id).map_err(|e| anyhow::anyhow!("W&B run id: {e}"))?;
            id
        }
        None => new_run_id(),
    };
    std::fs::create_dir_all(id_file.parent().unwrap()).with_context(|| format!("creating {}", output.join("wandb").display()))?;
    std::fs::write(&id_file, &run_id).with_context(|| format!("writing {}", id_file.display()))?;
    let output_name = output.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()));
    let timeout = env("WANDB_HTTP_TIMEOUT").and_then(|t| t.parse::<f64>().ok()).filter(|t| *t > 0.0).unwrap_or(20.0);
    Ok(Destinations {
        tensorboard,
        wandb: Some(Settings {
            base_url: env("WANDB_BASE_URL").unwrap_or_else(|| "https://api.wandb.ai".into()).trim_end_matches('/').to_string(),
            api_key,
            project: run.wandb_project.clone().or_else(|| env("WANDB_PROJECT")).unwrap_or_else(|| "uncategorized".into()),
            entity: run.wandb_entity.clone().or_else(|| env("WANDB_ENTITY")),
            display_name: run.wandb_name.clone().or_else(|| env("WANDB_NAME")).or(output_name).unwrap_or_else(|| run_id.clone()),
            run_id,
            group: run.wandb_group.clone().or_else(|| env("WANDB_RUN_GROUP")),
            tags: run.wandb_tags.clone().unwrap_or_else(|| env("WANDB_TAGS").map(|t| t.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()).unwrap_or_default()),
            offline,
            http_timeout: Duration::from_secs_f64(timeout),
        }),
    })
}

/// An 8-character id of lowercase letters and digits, as the official client makes them.
fn new_run_id() -> String {
    use sha2::Digest;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let h = sha2::Sha256::digest(format!("{nanos}-{}-{:?}", std::process::id(), std::thread::current().id()).as_bytes());
    const ABC: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    h.iter().take(8).map(|b| ABC[*b as usize % ABC.len()] as char).collect()
}

/// W&B's config layout: each top-level key as `{"desc": null, "value": v}`.
pub fn wandb_config(config: &Value) -> Value {
    match config {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), json!({"desc": null, "value": v}))).collect()),
        v => json!({"config": {"desc": null, "value": v}}),
    }
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

enum Msg {
    Row(Map<String, Value>, f64, f64),
    Finish(i32),
}

/// A W&B run being logged to: rows go to a background thread (online) or to files (offline).
pub struct Wandb {
    tx: Mutex<Option<Sender<Msg>>>,
    done: Mutex<Option<Receiver<()>>>,
    started: Instant,
    timeout: Duration,
}

impl Wandb {
    /// Starts logging: creates the run (online, on the background thread) or the offline directory.
    pub fn start(s: Settings, config: Value, output: &Path) -> Result<Wandb> {
        let (tx, rx) = channel();
        let (done_tx, done_rx) = channel();
        let timeout = s.http_timeout;
        if s.offline {
            let dir = output.join("wandb").join(format!("offline-run-{}", s.run_id));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&wandb_config(&config))?)?;
            std::fs::write(dir.join("run.json"), serde_json::to_vec_pretty(&upsert_variables(&s, &config))?)?;
            eprintln!("W&B offline: rows for run {} go to {}", s.run_id, dir.display());
            std::thread::spawn(move || offline_worker(dir, rx, done_tx));
        } else {
            eprintln!("W&B: logging to {}/{} run {} ({})", s.entity.as_deref().unwrap_or("<default entity>"), s.project, s.run_id, s.base_url);
            std::thread::Builder::new().name("wandb".into()).spawn(move || online_worker(s, config, rx, done_tx))?;
        }
        Ok(Wandb { tx: Mutex::new(Some(tx)), done: Mutex::new(Some(done_rx)), started: Instant::now(), timeout })
    }

    /// Queues one metrics record (never blocks on the network).
    pub fn log(&self, record: &Map<String, Value>) {
        if let Some(tx) = self.tx.lock().ok().and_then(|g| g.clone()) {
            let _ = tx.send(Msg::Row(record.clone(), self.started.elapsed().as_secs_f64(), now_s()));
        }
    }

    /// Sends what is queued and marks the run finished with `exitcode`; waits at most about two request
    /// timeouts for the server. Later calls do nothing.
    pub fn finish(&self, exitcode: i32) {
        let Some(tx) = self.tx.lock().ok().and_then(|mut g| g.take()) else { return };
        let _ = tx.send(Msg::Finish(exitcode));
        if let Some(done) = self.done.lock().ok().and_then(|mut g| g.take()) {
            if let Err(RecvTimeoutError::Timeout) = done.recv_timeout(self.timeout * 2 + Duration::from_secs(1)) {
                eprintln!("warning: W&B: the server did not confirm the end of the run in time; metrics.jsonl and TensorBoard hold every row");
            }
        }
    }
}

impl Drop for Wandb {
    /// A run that ends without `finish` (an error) is marked failed.
    fn drop(&mut self) {
        self.finish(1);
    }
}

fn upsert_variables(s: &Settings, config: &Value) -> Value {
    json!({
        "name": s.run_id,
        "project": s.project,
        "entity": s.entity,
        "displayName": s.display_name,
        "groupName": s.group,
        "tags": s.tags,
        "jobType": "train",
        "program": "whet train",
        "host": std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()),
        "config": wandb_config(config).to_string(),
    })
}

const UPSERT_BUCKET: &str = "mutation UpsertBucket($id: String, $name: String, $project: String, $entity: String, \
$groupName: String, $displayName: String, $config: JSONString, $host: String, $program: String, $jobType: String, \
$tags: [String!]) { upsertBucket(input: {id: $id, name: $name, modelName: $project, entityName: $entity, \
groupName: $groupName, displayName: $displayName, config: $config, host: $host, jobProgram: $program, \
jobType: $jobType, tags: $tags}) { bucket { id name displayName historyLineCount project { id name entity { id name } } } inserted } }";

/// The rows of one batch as history lines: `_step` numbers them from `offset`.
fn history_lines(rows: &[(Map<String, Value>, f64, f64)], offset: u64) -> Vec<String> {
    rows.iter()
        .enumerate()
        .map(|(i, (r, runtime, ts))| {
            let mut m = r.clone();
            m.insert("_step".into(), json!(offset + i as u64));
            m.insert("_runtime".into(), json!(runtime));
            m.insert("_timestamp".into(), json!(ts));
            Value::Object(m).to_string()
        })
        .collect()
}

/// Latest value of every numeric key, for the run summary.
fn update_summary(summary: &mut Map<String, Value>, rows: &[(Map<String, Value>, f64, f64)]) {
    for (r, runtime, _) in rows {
        for (k, v) in r.iter().filter(|(_, v)| v.is_number()) {
            summary.insert(k.clone(), v.clone());
        }
        summary.insert("_runtime".into(), json!(runtime));
    }
}

struct Client {
    http: reqwest::blocking::Client,
    s: Settings,
}

impl Client {
    fn post(&self, url: &str, body: &Value) -> std::result::Result<Value, String> {
        let resp = self.http.post(url).basic_auth("api", Some(&self.s.api_key)).json(body).send().map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let text = resp.text().unwrap_or_default();
        if !status.is_success() {
            let hint = if status.as_u16() == 401 { " (check WANDB_API_KEY)" } else { "" };
            return Err(format!("{url}: HTTP {status}{hint}: {}", text.chars().take(200).collect::<String>()));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates or continues the run: (file_stream URL, history lines already there).
    fn upsert(&self, config: &Value) -> std::result::Result<(String, u64), String> {
        let url = format!("{}/graphql", self.s.base_url);
        let reply = self.post(&url, &json!({"query": UPSERT_BUCKET, "variables": upsert_variables(&self.s, config)}))?;
        if let Some(errs) = reply.get("errors").filter(|e| !e.is_null()) {
            return Err(format!("{url}: {}", errs.to_string().chars().take(300).collect::<String>()));
        }
        let bucket = &reply["data"]["upsertBucket"]["bucket"];
        let entity = bucket["project"]["entity"]["name"].as_str().map(String::from).or_else(|| self.s.entity.clone()).ok_or_else(|| format!("{url}: the reply names no entity"))?;
        let project = bucket["project"]["name"].as_str().unwrap_or(&self.s.project).to_string();
        let run = bucket["name"].as_str().unwrap_or(&self.s.run_id).to_string();
        let app = if self.s.base_url == "https://api.wandb.ai" { "https://wandb.ai".to_string() } else { self.s.base_url.clone() };
        eprintln!("W&B run: {app}/{entity}/{project}/runs/{run}");
        Ok((format!("{}/files/{entity}/{project}/{run}/file_stream", self.s.base_url), bucket["historyLineCount"].as_u64().unwrap_or(0)))
    }
}

fn give_up(why: &str) {
    eprintln!("warning: W&B logging stopped: {why}; metrics.jsonl and TensorBoard still get every row");
}

fn online_worker(s: Settings, config: Value, rx: Receiver<Msg>, done: Sender<()>) {
    let http = match reqwest::blocking::Client::builder().timeout(s.http_timeout).user_agent(concat!("whet/", env!("CARGO_PKG_VERSION"))).build() {
        Ok(c) => c,
        Err(e) => {
            give_up(&format!("HTTP client: {e}"));
            drain(rx, done);
            return;
        }
    };
    let client = Client { http, s };
    let (url, mut offset) = match client.upsert(&config) {
        Ok(x) => x,
        Err(e) => {
            give_up(&format!("creating the run: {e}"));
            drain(rx, done);
            return;
        }
    };
    let mut pending: Vec<(Map<String, Value>, f64, f64)> = vec![];
    let mut summary = Map::new();
    let (mut last_post, mut failures) = (Instant::now(), 0);
    let flush = flush_interval();
    let exitcode = loop {
        let mut finish = None;
        match rx.recv_timeout(flush.max(Duration::from_millis(10))) {
            Ok(Msg::Row(r, rt, ts)) => pending.push((r, rt, ts)),
            Ok(Msg::Finish(c)) => finish = Some(c),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => finish = Some(1),
        }
        // take whatever else is queued, without waiting
        while finish.is_none() {
            match rx.try_recv() {
                Ok(Msg::Row(r, rt, ts)) => pending.push((r, rt, ts)),
                Ok(Msg::Finish(c)) => finish = Some(c),
                Err(_) => break,
            }
        }
        let due = finish.is_some() || last_post.elapsed() >= flush;
        if !pending.is_empty() && due {
            update_summary(&mut summary, &pending);
            let files = json!({
                "wandb-history.jsonl": {"offset": offset, "content": history_lines(&pending, offset)},
                "wandb-summary.json": {"offset": 0, "content": [Value::Object(summary.clone()).to_string()]},
            });
            match client.post(&url, &json!({"files": files})) {
                Ok(_) => {
                    offset += pending.len() as u64;
                    pending.clear();
                    failures = 0;
                    last_post = Instant::now();
                }
                Err(e) => {
                    failures += 1;
                    last_post = Instant::now(); // the next try waits a flush interval
                    if failures >= MAX_FAILURES || finish.is_some() {
                        give_up(&format!("sending history: {e}"));
                        drain(rx, done);
                        return;
                    }
                }
            }
        } else if last_post.elapsed() >= HEARTBEAT {
            let _ = client.post(&url, &json!({"complete": false, "failed": false}));
            last_post = Instant::now();
        }
        if let Some(c) = finish {
            break c;
        }
    };
    if let Err(e) = client.post(&url, &json!({"complete": true, "exitcode": exitcode})) {
        give_up(&format!("marking the run finished: {e}"));
    }
    let _ = done.send(());
}

/// After giving up: swallow rows until the end so that senders never notice.
fn drain(rx: Receiver<Msg>, done: Sender<()>) {
    for m in rx.iter() {
        if let Msg::Finish(_) = m {
            break;
        }
    }
    let _ = done.send(());
}

/// Offline: history lines appended to `wandb-history.jsonl`, the summary and exit code written at the end.
fn offline_worker(dir: PathBuf, rx: Receiver<Msg>, done: Sender<()>) {
    let path = dir.join("wandb-history.jsonl");
    let mut offset = std::fs::read_to_string(&path).map(|t| t.lines().count() as u64).unwrap_or(0);
    let mut summary = Map::new();
    let mut exitcode = 1;
    let mut failed = false;
    for m in rx.iter() {
        match m {
            Msg::Row(r, rt, ts) => {
                let rows = [(r, rt, ts)];
                update_summary(&mut summary, &rows);
                let line = history_lines(&rows, offset).remove(0);
                let res = std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| writeln!(f, "{line}"));
                if let (Err(e), false) = (res, failed) {
                    failed = true;
                    give_up(&format!("writing {}: {e}", path.display()));
                }
                offset += 1;
            }
            Msg::Finish(c) => {
                exitcode = c;
                break;
            }
        }
    }
    let _ = std::fs::write(dir.join("wandb-summary.json"), Value::Object(summary).to_string());
    let _ = std::fs::write(dir.join("exitcode"), exitcode.to_string());
    let _ = done.send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_lines_number_rows_from_the_offset() {
        let mut r = Map::new();
        r.insert("loss".into(), json!(1.5));
        let lines = history_lines(&[(r.clone(), 0.5, 100.0), (r, 1.0, 101.0)], 7);
        let v: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v[0]["_step"], 7);
        assert_eq!(v[1]["_step"], 8);
        assert_eq!(v[1]["loss"], 1.5);
        assert_eq!(v[1]["_runtime"], 1.0);
    }

    #[test]
    fn config_values_are_wrapped_as_the_client_does() {
        let c = wandb_config(&json!({"run": {"seed": 3}, "stage": [1]}));
        assert_eq!(c, json!({"run": {"desc": null, "value": {"seed": 3}}, "stage": {"desc": null, "value": [1]}}));
    }

    #[test]
    fn run_ids_are_checked() {
        assert!(check_run_id("ab12cd34").is_ok());
        assert!(check_run_id("a/b").is_err());
        assert!(check_run_id("").is_err());
        assert_eq!(new_run_id().len(), 8);
    }
}
