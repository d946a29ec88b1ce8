//! All-reduce bandwidth over c10d on this machine (Gloo on CPU):
//!
//!     cargo run --release -p dist --example allreduce -- [RANKS] [SIZES_MB...]
//!
//! starts RANKS copies of itself (default 2) with torchrun's variables around a store on 127.0.0.1 port 0,
//! times a SUM all-reduce of f32 tensors of each size (barrier before each; median and best of several
//! iterations after a warm-up) and prints one JSON line per size from rank 0: algbw = bytes / time, busbw =
//! algbw · 2(N−1)/N (nccl-tests' definitions).

use dist::{C10d, Communicator, Store};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn main() {
    let timeout = Duration::from_secs(60);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var("RANK").is_err() {
        let n: usize = args.first().map(|a| a.parse().expect("RANKS")).unwrap_or(2);
        let store = Store::server("127.0.0.1", 0, timeout).unwrap();
        let port = store.port().unwrap();
        let kids: Vec<_> = (0..n)
            .map(|r| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args(&args)
                    .env("RANK", r.to_string())
                    .env("WORLD_SIZE", n.to_string())
                    .env("MASTER_PORT", port.to_string())
                    .env("OMP_NUM_THREADS", "1")
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut k in kids {
            assert!(k.wait().unwrap().success());
        }
        return;
    }
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let world: usize = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
    let port: u16 = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
    let c = C10d::new(Store::client("127.0.0.1", port, timeout).unwrap(), "/bench/", rank, world, rank, None, timeout).unwrap();
    let sizes: Vec<f64> = if args.len() > 1 { args[1..].iter().map(|s| s.parse().unwrap()).collect() } else { vec![0.000004, 1.0, 25.0, 100.0] };
    for mb in sizes {
        let n = ((mb * 1e6) / 4.0).max(1.0) as i64;
        let t = Tensor::ones([n], (Kind::Float, tch::Device::Cpu));
        let iters = if mb < 10.0 { 50 } else { 9 };
        let mut times = vec![];
        for i in 0..=iters {
            c.barrier().unwrap();
            let t0 = Instant::now();
            c.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        let bytes = n as f64 * 4.0;
        let alg = bytes / med / 1e9;
        if rank == 0 {
            println!(
                "{{\"ranks\": {world}, \"bytes\": {bytes}, \"median_ms\": {:.3}, \"best_ms\": {:.3}, \"algbw_gbs\": {alg:.3}, \"busbw_gbs\": {:.3}}}",
                med * 1e3,
                times[0] * 1e3,
                alg * 2.0 * (world as f64 - 1.0) / world as f64
            );
        }
    }
}
