//! `rollout-bench`: times `Engine::generate` on fixed-length sampling (EOS ignored), for
//! scripts/bench/generate.py, which runs transformers' `generate` on the same model files and prompts.
//!
//!     rollout-bench --model DIR --prompts prompts.json --n 8 --new-tokens 128 --repeats 5 --warmup 1 --threads 1 \
//!         [--device cuda] [--dtype bfloat16] [--max-batch-seqs N] [--no-fuse] [--batches 64,128,256] [--adapter DIR] \
//!         [--static [--no-graphs] [--sync-every 16]] [--check-graphs]
//!
//! `--static` decodes with fixed-shape steps (`EngineConfig::static_decode`), on a CUDA device replayed as CUDA
//! graphs unless `--no-graphs`. `--check-graphs` instead compares, on the first batch size, static decoding
//! with graphs against the same without (greedy, T = 1 and top-p 0.9 rows): one JSON line with how many tokens
//! agree and the largest log-probability difference.
//!
//! `--adapter DIR` puts a PEFT LoRA adapter on the model: fused decoding then runs on weights with the adapter
//! merged in (once per call), `--no-fuse` applies it unmerged in every projection.
//!
//! `prompts.json` is a JSON list of token id lists. Prints one JSON object per batch size (`--batches`: the first
//! k prompts; default all): per-call seconds, tokens per call, median tokens/s and the process's peak resident
//! memory so far (VmHWM).

use model::Model;
use rollout::{Engine, EngineConfig, Request, SamplingParams};
use std::path::PathBuf;
use std::time::Instant;

fn peak_rss_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    model::runtime::preload_cuda();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut model_dir = None;
    let mut prompts_path = None;
    let (mut n, mut new_tokens, mut repeats, mut warmup, mut threads) = (1usize, 128usize, 5usize, 1usize, 1i32);
    let mut device = "cpu".to_string();
    let mut dtype = "float32".to_string();
    let mut max_batch = 1024usize;
    let mut fuse = true;
    let mut adapter = None;
    let mut batches: Option<Vec<usize>> = None;
    let (mut static_decode, mut graphs, mut sync_every, mut check_graphs) = (false, true, 16usize, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|_| format!("{a}: expected a number, got {s}"));
        match a.as_str() {
            "--model" => model_dir = Some(PathBuf::from(val()?)),
            "--prompts" => prompts_path = Some(PathBuf::from(val()?)),
            "--n" => n = num(val()?)?,
            "--new-tokens" => new_tokens = num(val()?)?,
            "--repeats" => repeats = num(val()?)?,
            "--warmup" => warmup = num(val()?)?,
            "--threads" => threads = num(val()?)? as i32,
            "--max-batch-seqs" => max_batch = num(val()?)?,
            "--device" => device = val()?,
            "--dtype" => dtype = val()?,
            "--no-fuse" => fuse = false,
            "--static" => static_decode = true,
            "--no-graphs" => graphs = false,
            "--sync-every" => sync_every = num(val()?)?,
            "--check-graphs" => check_graphs = true,
            "--adapter" => adapter = Some(PathBuf::from(val()?)),
            "--batches" => batches = Some(val()?.split(',').map(|x| num(x.to_string())).collect::<Result<_, _>>()?),
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let model_dir = model_dir.ok_or("--model is required")?;
    let prompts_path = prompts_path.ok_or("--prompts is required")?;
    tch::set_num_threads(threads);
    let device = model::runtime::parse_device(&device)?;
    let kind = model::parse_kind(&dtype)?;
    let text = std::fs::read_to_string(&prompts_path).map_err(|e| format!("{}: {e}", prompts_path.display()))?;
    let prompts: Vec<Vec<i64>> = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", prompts_path.display()))?;
    let mut m = Model::load(&model_dir, Some(kind), device).map_err(|e| e.to_string())?;
    if let Some(dir) = &adapter {
        m.load_adapter(dir).map_err(|e| e.to_string())?;
    }
    // whether decode steps run on model::native (what the engine's decode_weights picks)
    let native = fuse && m.net.decodes_natively();
    // one process for several batch sizes (the first k prompts each), to load the model once
    let batches = batches.unwrap_or_else(|| vec![prompts.len()]);
    if let Some(&k) = batches.iter().find(|&&k| k == 0 || k > prompts.len()) {
        return Err(format!("--batches: {k} is not within 1..={} (the prompts given)", prompts.len()));
    }
    if check_graphs {
        return compare_graphs(&m, &prompts[..batches[0]], new_tokens, max_batch, fuse, sync_every);
    }
    for &k in &batches {
        let prompts = &prompts[..k];
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let rows = prompts.len() * n;
        let cfg = EngineConfig {
            max_batch_seqs: max_batch,
            cache_budget_tokens: (rows * (longest + new_tokens)) as i64,
            fuse_weights: fuse,
            static_decode,
            cuda_graphs: graphs,
            sync_every,
            ..Default::default()
        };
        let engine = Engine::new(&m.net, cfg).map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        let mut stats = None;
        for r in 0..warmup + repeats {
            let reqs: Vec<Request> = prompts
                .iter()
                .map(|p| Request {
                    prompt_ids: p.clone(),
                    n,
                    params: SamplingParams { temperature: 1.0, max_new_tokens: new_tokens, ignore_eos: true, seed: Some(r as u64), ..Default::default() },
                })
                .collect();
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            let t = Instant::now();
            let (out, s) = engine.generate_with_stats(&reqs).map_err(|e| e.to_string())?;
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            let dt = t.elapsed().as_secs_f64();
            let got: usize = out.iter().map(|c| c.completion_tokens).sum();
            if got != rows * new_tokens {
                return Err(format!("generated {got} tokens, expected {}", rows * new_tokens));
            }
            if r >= warmup {
                times.push(dt);
            }
            stats = Some(s);
        }
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = sorted[sorted.len() / 2];
        let tokens = rows * new_tokens;
        println!(
            "{}",
            serde_json::json!({
                "side": "whet", "batch": k, "times": times, "tokens": tokens, "median_s": median, "tok_s": tokens as f64 / median,
                "peak_rss_kb": peak_rss_kb(), "threads": threads, "stats": stats, "fuse_weights": fuse,
                "native_decode": native && !static_decode, "static_decode": static_decode,
                "cuda_graphs": static_decode && graphs && model::cuda_graph::available(device).is_ok(),
                "graphs_unavailable": model::cuda_graph::available(device).err(),
            })
        );
    }
    Ok(())
}

/// Static decoding with CUDA graphs against the same steps run eagerly, on greedy, T = 1 and top-p rows.
fn compare_graphs(m: &Model, prompts: &[Vec<i64>], new_tokens: usize, max_batch: usize, fuse: bool, sync_every: usize) -> Result<(), String> {
    let device = m.net.device();
    model::cuda_graph::available(device)?;
    let reqs: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let base = SamplingParams { max_new_tokens: new_tokens, ignore_eos: true, seed: Some(i as u64), ..Default::default() };
            let params = match i % 3 {
                0 => SamplingParams { temperature: 0.0, ..base },
                1 => SamplingParams { temperature: 1.0, ..base },
                _ => SamplingParams { temperature: 0.8, top_p: 0.9, ..base },
            };
            Request { prompt_ids: p.clone(), n: 1, params }
        })
        .collect();
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let run = |cuda_graphs: bool| {
        let cfg = EngineConfig {
            max_batch_seqs: max_batch,
            cache_budget_tokens: (prompts.len() * (longest + new_tokens)) as i64,
            fuse_weights: fuse,
            static_decode: true,
            cuda_graphs,
            sync_every,
            // both padded to the graph buckets, so that every step multiplies the same shapes
            bucket_rows: Some(true),
            ..Default::default()
        };
        Engine::new(&m.net, cfg).and_then(|e| e.generate_with_stats(&reqs)).map_err(|e| e.to_string())
    };
    let (eager, _) = run(false)?;
    let (graphed, stats) = run(true)?;
    let (mut same, mut total, mut first_diff, mut max_lp) = (0usize, 0usize, Vec::new(), 0f32);
    for (a, b) in eager.iter().zip(&graphed) {
        let agree = a.token_ids.iter().zip(&b.token_ids).take_while(|(x, y)| x == y).count();
        same += agree;
        total += a.token_ids.len();
        if agree < a.token_ids.len() {
            first_diff.push((a.request_index, agree));
        }
        for (x, y) in a.logprobs_model.iter().zip(&b.logprobs_model).take(agree) {
            max_lp = max_lp.max((x - y).abs());
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "check": "cuda_graphs", "rows": reqs.len(), "tokens": total, "tokens_equal_before_first_difference": same,
            "rows_differing": first_diff.len(), "first_differences": first_diff.iter().take(8).collect::<Vec<_>>(),
            "max_logprob_diff": max_lp, "graph_captures": stats.graph_captures, "graph_replays": stats.graph_replays,
        })
    );
    Ok(())
}
