//! What slot refill buys when completions end at different lengths: 128 requests whose `max_new_tokens`
//! spread over 16..=256 (a fixed pseudo-random draw; EOS ignored, so each ends exactly there), decoded with at
//! most 32 rows at a time, with and without refill. fp32, one thread.
//!
//!     cargo run --release -p rollout --example refill -- /tmp/bench-assets/models/tiny [ROWS] [REQUESTS]
use model::Model;
use rollout::{Engine, EngineConfig, Request, SamplingParams};
use std::time::Instant;
use tch::Device;

fn main() {
    model::runtime::preload_cuda();
    tch::set_num_threads(1);
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: refill MODEL_DIR [ROWS=32] [REQUESTS=128]");
        std::process::exit(2);
    };
    let num = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().unwrap_or_else(|_| panic!("argument {i}: expected a number")));
    let (rows, n_req) = (num(2, 32), num(3, 128));
    let m = Model::load(std::path::Path::new(dir), None, Device::Cpu).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let vocab = m.net.cfg.vocab_size;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let reqs: Vec<Request> = (0..n_req)
        .map(|i| Request {
            prompt_ids: (0..24 + next() % 24).map(|_| (next() % vocab as u64) as i64).collect(),
            n: 1,
            params: SamplingParams { max_new_tokens: 16 + (next() % 241) as usize, ignore_eos: true, seed: Some(i as u64), ..Default::default() },
        })
        .collect();
    let tokens: usize = reqs.iter().map(|r| r.params.max_new_tokens).sum();
    for rep in 0..2 {
        for slot_refill in [false, true] {
            let e = Engine::new(&m.net, EngineConfig { max_batch_seqs: rows, slot_refill, ..Default::default() }).unwrap();
            let t = Instant::now();
            let (_, s) = e.generate_with_stats(&reqs).unwrap();
            let dt = t.elapsed().as_secs_f64();
            println!(
                "round {rep} slot_refill {slot_refill:5}: {:.2} s, {:.0} tok/s, waves {}, refills {}, decode steps {}, rows per step {:.1}",
                dt,
                tokens as f64 / dt,
                s.waves,
                s.refills,
                s.decode_steps,
                s.decode_row_steps as f64 / s.decode_steps as f64
            );
        }
    }
}
