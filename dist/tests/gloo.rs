//! The communicator over real c10d Gloo groups: N ranks as threads of this test process, rendezvous on a
//! store on 127.0.0.1 port 0 (no fixed ports: tests run in parallel), bounded timeouts (nothing can hang).

use dist::{C10d, Communicator, Single, Store};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `f(comm)` on `world` ranks (threads) and returns their results in rank order.
fn ranks<T: Send + 'static>(world: usize, f: impl Fn(C10d) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
    let server = Store::server("127.0.0.1", 0, TIMEOUT).unwrap();
    let port = server.port().unwrap();
    let hs: Vec<_> = (0..world)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || {
                let store = Store::client("127.0.0.1", port, TIMEOUT).unwrap();
                let c = C10d::new(store, "/test/", r, world, r, None, TIMEOUT).unwrap();
                f(c)
            })
        })
        .collect();
    let out = hs.into_iter().map(|h| h.join().unwrap()).collect();
    drop(server);
    out
}

fn bits(t: &Tensor) -> Vec<u32> {
    Vec::<f32>::try_from(t.reshape([-1])).unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn single_process_collectives_are_the_identity() {
    let c = Single;
    assert_eq!((c.rank(), c.world(), c.is_main()), (0, 1, true));
    let mut x = [1.5, 2.0];
    c.all_reduce_f64(&mut x).unwrap();
    assert_eq!(x, [1.5, 2.0]);
    assert_eq!(c.all_gather_bytes(b"abc").unwrap(), vec![b"abc".to_vec()]);
    c.barrier().unwrap();
}

#[test]
fn all_reduce_broadcast_barrier_and_gather_over_three_ranks() {
    let out = ranks(3, |c| {
        let r = c.rank();
        assert_eq!((c.world(), c.backend().as_str()), (3, "gloo"));
        let mut xs = [r as f64 + 0.5, 1.0];
        c.all_reduce_f64(&mut xs).unwrap();
        let mut ns = [r as i64 * 10, 1];
        c.all_reduce_i64(&mut ns).unwrap();
        let t = Tensor::full([4], r as f64 + 1.0, (Kind::Float, tch::Device::Cpu));
        c.broadcast(std::slice::from_ref(&t), 2).unwrap();
        c.barrier().unwrap();
        let got = c.all_gather_bytes(format!("rank{r}:{}", "x".repeat(r)).as_bytes()).unwrap();
        (xs, ns, Vec::<f32>::try_from(t).unwrap(), got)
    });
    for (xs, ns, t, got) in out {
        assert_eq!(xs, [4.5, 3.0]);
        assert_eq!(ns, [30, 3]);
        assert_eq!(t, vec![3.0; 4]);
        assert_eq!(got, vec![b"rank0:".to_vec(), b"rank1:x".to_vec(), b"rank2:xx".to_vec()]);
    }
}

/// Two ranks' gradients summed in flat buckets equal, bit for bit, the two partial gradients added in one
/// process (a + b is commutative in floating point); params broadcast from rank 0 are rank 0's.
#[test]
fn two_rank_gradient_buckets_are_bitwise_the_one_process_sum() {
    // pseudo-random values from a formula, not libtorch's global generator: the ranks are threads of this
    // process and would race on manual_seed + randn
    let grads_of = |r: usize| -> Vec<Tensor> {
        let t = |shape: &[i64], salt: f64| {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| ((i as f64 + 1.0) * (r as f64 + 1.3) * 12.9898 + salt).sin() as f32 * 3.7).collect();
            Tensor::from_slice(&v).view(shape)
        };
        vec![t(&[7, 3], 0.1), t(&[5], 0.2), t(&[2, 2, 2], 0.3)]
    };
    let expect: Vec<Vec<u32>> = grads_of(0).iter().zip(grads_of(1)).map(|(a, b)| bits(&(a + b))).collect();
    let out = ranks(2, move |c| {
        let r = c.rank();
        let params: Vec<Tensor> = grads_of(r).iter().map(|g| Tensor::zeros_like(g).set_requires_grad(true)).collect();
        // gradients equal to grads_of(r): backward of sum(p * g)
        let loss = params.iter().zip(grads_of(r)).map(|(p, g)| (p * g).sum(Kind::Float)).reduce(|a, b| a + b).unwrap();
        loss.backward();
        c.all_reduce_grads(&params).unwrap();
        let got: Vec<Vec<u32>> = params.iter().map(|p| bits(&p.grad())).collect();
        let init: Vec<Tensor> = (0..2).map(|_| Tensor::full([3], r as f64, (Kind::Float, tch::Device::Cpu))).collect();
        c.broadcast_params(&init).unwrap();
        (got, init.iter().map(bits).collect::<Vec<_>>())
    });
    for (got, init) in out {
        assert_eq!(got, expect);
        assert_eq!(init, vec![bits(&Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))); 2]);
    }
}

/// A rank that leaves makes the others' next collective fail within seconds with c10d's message.
#[test]
fn a_dead_peer_fails_the_next_collective_within_seconds() {
    let out = ranks(2, |c| {
        if c.rank() == 1 {
            drop(c);
            return None;
        }
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let t = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
        let e = c.all_reduce_sum(std::slice::from_ref(&t)).expect_err("peer is gone");
        Some((t0.elapsed(), e.to_string()))
    });
    let (dt, msg) = out[0].clone().unwrap();
    assert!(dt < Duration::from_secs(15), "took {dt:?}: {msg}");
    assert!(msg.starts_with("all-reduce: ") && !msg.contains('\n'), "{msg}");
}

#[test]
fn joining_a_store_nobody_hosts_times_out_with_a_clear_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t0 = Instant::now();
    let e = Store::client("127.0.0.1", port, Duration::from_secs(1)).err().expect("no store there");
    assert!(t0.elapsed() < Duration::from_secs(15));
    let msg = e.to_string();
    assert!(msg.contains(&format!("connecting to the rendezvous store at 127.0.0.1:{port}")), "{msg}");
}

/// Flat all-gather and reduce-scatter (the collectives sharded data parallelism runs on) over four ranks:
/// the gathered buffer holds every rank's block in rank order, and each rank's scattered block is the sum
/// of the ranks' blocks there, exactly (integers in fp32) and for fp32 values within a few ulp of the
/// all-reduce's.
#[test]
fn flat_all_gather_and_reduce_scatter_over_four_ranks() {
    let out = ranks(4, |c| {
        let r = c.rank() as f64;
        let mine = Tensor::arange(3, (Kind::Float, tch::Device::Cpu)) + 10.0 * r;
        let all = Tensor::zeros([12], (Kind::Float, tch::Device::Cpu));
        c.all_gather_flat(&all, &mine).unwrap();
        // every rank contributes 12 values; rank r keeps block r of the sum
        let contrib = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)) * (r + 1.0);
        let block = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        c.reduce_scatter_flat_sum(&block, &contrib).unwrap();
        // started, then waited: the same results (two in flight at once)
        let all2 = Tensor::zeros([12], (Kind::Float, tch::Device::Cpu));
        let block2 = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        let a = c.all_gather_flat_start(&all2, &mine).unwrap();
        let b = c.reduce_scatter_flat_sum_start(&block2, &contrib).unwrap();
        a.wait().unwrap();
        b.wait().unwrap();
        assert!(all2.equal(&all) && block2.equal(&block));
        // a mismatched buffer is an error, not a crash
        let bad = c.all_gather_flat(&Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)), &mine).unwrap_err();
        (Vec::<f32>::try_from(all).unwrap(), Vec::<f32>::try_from(block).unwrap(), bad.to_string())
    });
    for (r, (all, block, bad)) in out.into_iter().enumerate() {
        assert_eq!(all, vec![0., 1., 2., 10., 11., 12., 20., 21., 22., 30., 31., 32.]);
        // Σ_k (k + 1) · i = 10 · i for i in block r
        let want: Vec<f32> = (0..3).map(|j| 10.0 * (3 * r + j) as f32).collect();
        assert_eq!(block, want);
        assert!(bad.contains("not 4 blocks of 3"), "{bad}");
    }
    let one = Single;
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    let o = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    one.all_gather_flat(&o, &t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&o).unwrap(), vec![1.0, 2.0]);
}
