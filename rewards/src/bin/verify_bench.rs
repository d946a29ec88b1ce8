//! Throughput and latency of `math::verify` on one core over the math-verify peer cases.
//!
//! `cargo run --release -p rewards --bin verify-bench [-- CASES.jsonl [SECONDS]]`
use rewards::math::{verify, VerifyConfig};
use std::time::{Duration, Instant};

/// CPU time consumed by this thread (excludes time the OS ran other processes).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/peers/math-verify/cases.jsonl");
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| default.to_string());
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("verify-bench: reading {path}: {e}");
            std::process::exit(2);
        }
    };
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => pairs.push((v["gold"].as_str().unwrap_or("").to_string(), v["pred"].as_str().unwrap_or("").to_string())),
            Err(e) => {
                eprintln!("verify-bench: {path}:{}: {e}", i + 1);
                std::process::exit(2);
            }
        }
    }
    let cfg = VerifyConfig::default();
    // Warm-up pass.
    for (g, p) in &pairs {
        std::hint::black_box(verify(g, p, &cfg));
    }
    let mut lat: Vec<Duration> = Vec::new();
    let mut cpu: Vec<Duration> = Vec::new();
    let mut per_case: Vec<Vec<Duration>> = vec![Vec::new(); pairs.len()];
    let start = Instant::now();
    let mut rounds = 0;
    let mut busy = Duration::ZERO;
    while busy.as_secs_f64() < secs || rounds == 0 {
        // Sleep 1 ms between rounds (not timed): under `chrt` this keeps the thread below the
        // kernel's real-time budget (sched_rt_runtime_us), which would otherwise pause it ~50 ms/s.
        if rounds > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let round_start = Instant::now();
        for (k, (g, p)) in pairs.iter().enumerate() {
            let c0 = thread_cpu();
            let t = Instant::now();
            std::hint::black_box(verify(g, p, &cfg));
            let d = t.elapsed();
            cpu.push(thread_cpu().saturating_sub(c0));
            lat.push(d);
            per_case[k].push(d);
        }
        busy += round_start.elapsed();
        rounds += 1;
    }
    let _ = start;
    let total = busy;
    lat.sort();
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    let n = lat.len();
    println!("pairs: {} ({} distinct x {} rounds), one thread", n, pairs.len(), rounds);
    println!("throughput: {:.0} pairs/s (time inside rounds)", n as f64 / total.as_secs_f64());
    // Slowest cases by their median over rounds (robust to scheduler noise).
    let mut meds: Vec<(Duration, usize)> = per_case.iter_mut().enumerate().map(|(k, v)| { v.sort(); (v[v.len() / 2], k) }).collect();
    meds.sort();
    for (d, k) in meds.iter().rev().take(3) {
        println!("slowest cases by median: line {} median {:.1} us", k + 1, d.as_secs_f64() * 1e6);
    }
    // The largest single latencies, with that case's median: a max far above its case's median
    // is the OS preempting the thread, not the verifier.
    let mut maxes: Vec<(Duration, usize)> = per_case.iter().enumerate().map(|(k, v)| (*v.last().unwrap(), k)).collect();
    maxes.sort();
    for (d, k) in maxes.iter().rev().take(3) {
        println!("largest single latencies: line {} max {:.1} us (its median {:.1} us)", k + 1, d.as_secs_f64() * 1e6, per_case[*k][per_case[*k].len() / 2].as_secs_f64() * 1e6);
    }
    let worst_median = meds.last().map(|m| m.0).unwrap_or_default();
    println!("max of per-case medians: {:.1} us", worst_median.as_secs_f64() * 1e6);
    cpu.sort();
    println!("on-CPU time per pair: median {:.1} us, p99 {:.1} us, max {:.1} us", cpu[n / 2].as_secs_f64() * 1e6, cpu[((n as f64 - 1.0) * 0.99).round() as usize].as_secs_f64() * 1e6, cpu[n - 1].as_secs_f64() * 1e6);
    println!("wall latency: median {:.1} us, p99 {:.1} us, max {:.1} us", pct(0.5).as_secs_f64() * 1e6, pct(0.99).as_secs_f64() * 1e6, lat[n - 1].as_secs_f64() * 1e6);
}
