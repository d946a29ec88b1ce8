//! Exec plugins (the example Python plugin) through crash, hang, malformed JSON and wrong batch
//! size; http plugins against a server started on 127.0.0.1 by the test.

use rewards::plugin::{OnFailure, PluginConfig, Transport};
use rewards::{RewardConfig, RewardSet, Sample};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PLUGIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/plugins/length_plugin.py");

fn have_python() -> bool {
    let ok = std::process::Command::new("python3").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        eprintln!("SKIP: python3 not available");
    }
    ok
}

fn exec_cfg(on_failure: OnFailure) -> PluginConfig {
    PluginConfig {
        weight: 1.0,
        name: "length".into(),
        transport: Transport::Exec,
        command: vec!["python3".into(), PLUGIN.into()],
        env: Default::default(),
        url: None,
        timeout_s: 5.0,
        retries: 1,
        max_restarts: 5,
        on_failure,
        failure_reward: -0.25,
        params: serde_json::json!({ "target_chars": 10 }),
    }
}

fn batch(texts: &[&str]) -> Vec<Sample> {
    texts.iter().map(|t| Sample { completion: t.to_string(), max_tokens: 100, ..Default::default() }).collect()
}

#[test]
fn exec_plugin_scores_batches() {
    if !have_python() {
        return;
    }
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(exec_cfg(OnFailure::Fail))]).unwrap();
    let mut b = batch(&["hello", "x", "0123456789abcdefghij"]);
    b[1].row.insert("skip".into(), serde_json::json!(true));
    let s = rs.score_batch(&b).unwrap();
    assert_eq!(s.total, vec![Some(0.5), None, Some(-1.0)]);
    assert_eq!(s.metrics["reward/length/chars"], (5.0 + 1.0 + 20.0) / 3.0);
    // The same process serves the next batch.
    let s = rs.score_batch(&batch(&["12345678"])).unwrap();
    assert!((s.total[0].unwrap() - 0.2).abs() < 1e-12);
    assert_eq!(s.metrics["reward/length/restarts"], 0.0);
}

#[test]
fn exec_failures_with_fixed_reward_then_recovery() {
    if !have_python() {
        return;
    }
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(exec_cfg(OnFailure::Fixed))]).unwrap();
    for marker in ["__crash__", "__malformed__", "__wrong_size__"] {
        let s = rs.score_batch(&batch(&["ok", marker])).unwrap();
        assert_eq!(s.total, vec![Some(-0.25), Some(-0.25)], "{marker}");
        assert_eq!(s.metrics["reward/length/failed"], 1.0, "{marker}");
        // A normal batch afterwards works again (on a restarted process).
        let s = rs.score_batch(&batch(&["hello"])).unwrap();
        assert_eq!(s.total, vec![Some(0.5)], "after {marker}");
        assert_eq!(s.metrics["reward/length/failed"], 0.0);
    }
}

#[test]
fn exec_hang_times_out() {
    if !have_python() {
        return;
    }
    let mut cfg = exec_cfg(OnFailure::Fixed);
    cfg.timeout_s = 0.5;
    cfg.retries = 1;
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(cfg)]).unwrap();
    let t = Instant::now();
    let s = rs.score_batch(&batch(&["__hang__"])).unwrap();
    assert_eq!(s.total, vec![Some(-0.25)]);
    assert!(t.elapsed() < Duration::from_secs(5), "hang took {:?}", t.elapsed());
    let s = rs.score_batch(&batch(&["hello"])).unwrap();
    assert_eq!(s.total, vec![Some(0.5)]);
}

#[test]
fn exec_plugin_that_never_reads_cannot_block_on_a_full_pipe() {
    if !have_python() {
        return;
    }
    let mut cfg = exec_cfg(OnFailure::Fixed);
    cfg.timeout_s = 0.5;
    cfg.retries = 0;
    cfg.env.insert("WHET_PLUGIN_STALL".into(), "1".into());
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(cfg)]).unwrap();
    // 4 MB request: far more than a pipe buffer.
    let big = "x".repeat(4 << 20);
    let t = Instant::now();
    let s = rs.score_batch(&batch(&[&big])).unwrap();
    assert_eq!(s.total, vec![Some(-0.25)]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn exec_failure_fails_the_step_when_asked() {
    if !have_python() {
        return;
    }
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(exec_cfg(OnFailure::Fail))]).unwrap();
    let e = rs.score_batch(&batch(&["__wrong_size__", "b"])).err().unwrap().to_string();
    assert!(e.contains("length") && e.contains("1 rewards for a batch of 2"), "{e}");
    let e = rs.score_batch(&batch(&["__malformed__"])).err().unwrap().to_string();
    assert!(e.contains("malformed JSON"), "{e}");
}

#[test]
fn exec_crash_once_is_retried_transparently() {
    if !have_python() {
        return;
    }
    let state = std::env::temp_dir().join(format!("whet-crash-once-{}", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let mut cfg = exec_cfg(OnFailure::Fail);
    cfg.env.insert("WHET_PLUGIN_STATE".into(), state.display().to_string());
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(cfg)]).unwrap();
    let s = rs.score_batch(&batch(&["__crash_once__"])).unwrap();
    assert!(s.total[0].is_some());
    assert_eq!(s.metrics["reward/length/restarts"], 1.0);
    let _ = std::fs::remove_file(&state);
}

#[test]
fn exec_restarts_are_bounded() {
    if !have_python() {
        return;
    }
    let mut cfg = exec_cfg(OnFailure::Fixed);
    cfg.max_restarts = 2;
    cfg.retries = 0;
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(cfg)]).unwrap();
    for _ in 0..3 {
        rs.score_batch(&batch(&["__crash__"])).unwrap();
    }
    // Three crashed batches in a row used up the two restarts: the plugin is dead and fails fast.
    let t = Instant::now();
    let s = rs.score_batch(&batch(&["hello"])).unwrap();
    assert_eq!(s.total, vec![Some(-0.25)]);
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[test]
fn exec_missing_program_is_a_clear_error() {
    let mut cfg = exec_cfg(OnFailure::Fail);
    cfg.command = vec!["/nonexistent/whet-plugin".into()];
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(cfg)]).unwrap();
    let e = rs.score_batch(&batch(&["x"])).err().unwrap().to_string();
    assert!(e.contains("cannot start") && e.contains("whet-plugin"), "{e}");
}

/// A tiny HTTP/1.1 server: `behaviour(request_index, body) -> (status, body, delay)`.
fn serve<F>(behaviour: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(usize, &serde_json::Value) -> (u16, String, Duration) + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let i = h.fetch_add(1, Ordering::SeqCst);
            let (status, out, delay) = behaviour(i, &req);
            std::thread::sleep(delay);
            let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}", out.len());
        }
    });
    (url, hits)
}

fn http_cfg(url: &str, on_failure: OnFailure) -> PluginConfig {
    PluginConfig { transport: Transport::Http, command: vec![], url: Some(url.into()), timeout_s: 0.5, retries: 2, name: "remote".into(), ..exec_cfg(on_failure) }
}

fn echo_lengths(req: &serde_json::Value) -> String {
    let n: Vec<f64> = req["samples"].as_array().unwrap().iter().map(|s| s["completion"].as_str().unwrap().len() as f64).collect();
    serde_json::json!({ "batch_id": req["batch_id"], "rewards": n, "metrics": { "calls": 1 } }).to_string()
}

#[test]
fn http_plugin_posts_and_retries() {
    // First request fails with 500, the retry succeeds.
    let (url, hits) = serve(|i, req| if i == 0 { (500, "oops".into(), Duration::ZERO) } else { (200, echo_lengths(req), Duration::ZERO) });
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(http_cfg(&url, OnFailure::Fail))]).unwrap();
    let s = rs.score_batch(&batch(&["abc", "hello"])).unwrap();
    assert_eq!(s.total, vec![Some(3.0), Some(5.0)]);
    assert_eq!(s.metrics["reward/remote/calls"], 1.0);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[test]
fn http_plugin_timeout_and_malformed() {
    let (url, _) = serve(|_, _| (200, "{}".into(), Duration::from_secs(2)));
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(http_cfg(&url, OnFailure::Fixed))]).unwrap();
    let t = Instant::now();
    let s = rs.score_batch(&batch(&["abc"])).unwrap();
    assert_eq!(s.total, vec![Some(-0.25)]);
    assert_eq!(s.metrics["reward/remote/failed"], 1.0);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    let (url, _) = serve(|_, _| (200, "not json".into(), Duration::ZERO));
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(http_cfg(&url, OnFailure::Fail))]).unwrap();
    let e = rs.score_batch(&batch(&["abc"])).err().unwrap().to_string();
    assert!(e.contains("malformed JSON"), "{e}");

    let (url, _) = serve(|_, req| (200, serde_json::json!({ "batch_id": req["batch_id"], "rewards": [1.0] }).to_string(), Duration::ZERO));
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(http_cfg(&url, OnFailure::Fail))]).unwrap();
    let e = rs.score_batch(&batch(&["a", "b"])).err().unwrap().to_string();
    assert!(e.contains("1 rewards for a batch of 2"), "{e}");
}

#[test]
fn http_plugin_at_a_closed_port_says_the_connection_was_refused() {
    // a port nobody listens on: bind, note it, close
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/score");
    let rs = RewardSet::from_config(&[RewardConfig::Plugin(http_cfg(&url, OnFailure::Fail))]).unwrap();
    let e = rs.score_batch(&batch(&["abc"])).err().unwrap().to_string();
    assert!(e.contains(&url) && e.to_lowercase().contains("connection refused"), "{e}");
}
