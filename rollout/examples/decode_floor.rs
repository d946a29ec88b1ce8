//! Where generation time goes: the model's `forward_cached` + argmax alone (no engine; on the parameters, on the
//! fused, MKL-packed libtorch copy and on the native step's weights, `decode_weights_with`) against
//! `Engine::generate` (prefill, sampling, bookkeeping), fp32, one thread, prompts of 40 tokens, 128 new tokens.
//!
//!     cargo run --release -p rollout --example decode_floor -- /tmp/bench-assets/models/tiny 16
use model::{KvCache, Model};
use rollout::{Engine, EngineConfig, Request, SamplingParams};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn main() {
    model::runtime::preload_cuda();
    tch::set_num_threads(1);
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: decode_floor MODEL_DIR BATCH");
        std::process::exit(2);
    }
    let m = Model::load(std::path::Path::new(&args[1]), None, Device::Cpu).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let b: i64 = args[2].parse().unwrap_or_else(|_| {
        eprintln!("error: BATCH must be a number");
        std::process::exit(2)
    });
    let _g = tch::no_grad_guard();
    let steps = 128;
    let mut fused = m.net.decode_weights_with(None);
    fused.prepare_rows(b);
    let native = m.net.decode_weights_with(Some(1));
    for _rep in 0..3 {
        let cap = 40 + steps;
        let mut cache = KvCache::new(&m.net.cfg, b, cap, Kind::Float, Device::Cpu);
        let ids = Tensor::ones([b, 40], (Kind::Int64, Device::Cpu));
        let pos = Tensor::arange(40, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([b, 1]);
        let mask = Tensor::ones([b, cap], (Kind::Bool, Device::Cpu));
        let t = Instant::now();
        let l = m.net.forward_cached(&ids, &pos, &mask.narrow(1, 0, 40), &mut cache);
        let mut tok = l.select(1, 39).argmax(-1, false);
        let mut p = Tensor::full([b, 1], 40, (Kind::Int64, Device::Cpu));
        for _ in 0..steps - 1 {
            let len = cache.len();
            let l = m.net.forward_cached(&tok.view([-1, 1]), &p, &mask.narrow(1, 0, len + 1), &mut cache).squeeze_dim(1);
            tok = l.argmax(-1, false);
            let _ = p.g_add_scalar_(1);
        }
        let dt = t.elapsed().as_secs_f64() / steps as f64;
        // the same on the fused, packed libtorch copy and on the native step's weights
        let run = |weights: &model::DecodeWeights| {
            let mut cache = KvCache::new(&m.net.cfg, b, cap, Kind::Float, Device::Cpu);
            let mut p = Tensor::full([b, 1], 40, (Kind::Int64, Device::Cpu));
            let t = Instant::now();
            let l = m.net.forward_cached_with(&ids, &pos, &mask.narrow(1, 0, 40), &mut cache, Some(weights));
            let mut tok = l.select(1, 39).argmax(-1, false);
            for _ in 0..steps - 1 {
                let len = cache.len();
                let l = m.net.forward_cached_with(&tok.view([-1, 1]), &p, &mask.narrow(1, 0, len + 1), &mut cache, Some(weights)).squeeze_dim(1);
                tok = l.argmax(-1, false);
                let _ = p.g_add_scalar_(1);
            }
            t.elapsed().as_secs_f64() / steps as f64
        };
        let (dt_fused, dt_native) = (run(&fused), run(&native));
        let e = Engine::new(&m.net, EngineConfig::default()).unwrap();
        let reqs: Vec<Request> = (0..b).map(|i| Request { prompt_ids: vec![1 + i; 40], n: 1, params: SamplingParams { max_new_tokens: steps as usize, ignore_eos: true, seed: Some(1), ..Default::default() } }).collect();
        let t2 = Instant::now();
        e.generate(&reqs).unwrap();
        let dt2 = t2.elapsed().as_secs_f64();
        println!(
            "batch {b}: model forward_cached + argmax {:.3} ms/token-step, on fused/packed weights {:.3}, native {:.3} (native: {}); Engine::generate {:.3} ms/token-step (all with the prefill)",
            dt * 1000.0,
            dt_fused * 1000.0,
            dt_native * 1000.0,
            native.is_native(),
            dt2 * 1000.0 / steps as f64
        );
    }
}
