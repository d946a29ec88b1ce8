//! The data-parallel launcher, torchrun's contract in Rust:
//!
//! `train --nproc-per-node N [--nnodes M --node-rank K --master-addr A --master-port P] [--max-restarts R] ...`
//!
//! starts N copies of this binary (the same arguments, less the launcher's) with `RANK`, `LOCAL_RANK`,
//! `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `GROUP_WORLD_SIZE`, `ROLE_RANK`, `ROLE_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`, `TORCHELASTIC_USE_AGENT_STORE=True`, `TORCHELASTIC_RESTART_COUNT`,
//! `TORCHELASTIC_MAX_RESTARTS` and `TORCHELASTIC_RUN_ID` set. Node 0's launcher hosts the rendezvous
//! `TCPStore` (single node: on 127.0.0.1, port 0 = a free port, so concurrent jobs never clash); every
//! rank is a client (../shared/notes/distributed-c10d.md §4, problem 10).
//!
//! When a rank exits with an error or is killed, the launcher kills the others at once (they would fail
//! at their next collective anyway) and, while restarts remain, starts them all again resuming from the
//! latest checkpoint (`--resume auto`), under a fresh key prefix (`/worker/attempt_N/`).
//!
//! A process that finds `RANK`/`WORLD_SIZE` already set is a worker (torchrun `--no-python`, SLURM
//! wrappers, Kubernetes) and joins the job instead: [`join`].

use anyhow::{bail, Context, Result};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The launcher's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// Data parallelism: start this many ranks on this node (torchrun's `--nproc-per-node`).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub nnodes: usize,
    /// This node's index (0 hosts the rendezvous store).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub node_rank: usize,
    /// Address of node 0 (default 127.0.0.1 on one node).
    #[arg(long, value_name = "ADDR")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store on node 0 (default: any free port on one node; required with --nnodes > 1).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// Restart the whole job from its latest checkpoint this many times when a rank fails.
    #[arg(long, default_value_t = 0, value_name = "R")]
    pub max_restarts: usize,
}

/// Flags of the launcher that take a value (removed from the workers' command line).
const FLAGS: &[&str] = &["--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--max-restarts"];

/// The workers' arguments: ours without the launcher's flags; on restarts, `--resume auto`.
fn worker_args(args: &[String], restart: bool) -> Vec<String> {
    let mut out = vec![];
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let drop = FLAGS.iter().chain(if restart { &["--resume"][..] } else { &[][..] }).find(|f| a == *f || a.starts_with(&format!("{f}=")));
        match drop {
            Some(f) if a == f => i += 2,
            Some(_) => i += 1,
            None => {
                out.push(a.clone());
                i += 1;
            }
        }
    }
    if restart {
        out.extend(["--resume".to_string(), "auto".to_string()]);
    }
    out
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGINT => " (SIGINT)",
                _ => "",
            };
            format!("was killed by signal {s}{name}")
        }
        _ => "ended".into(),
    }
}

/// Runs the job as its launcher (the agent of this node).
pub fn agent(l: &LaunchArgs, nproc: usize) -> Result<()> {
    if nproc == 0 || l.nnodes == 0 {
        bail!("--nproc-per-node and --nnodes must be at least 1");
    }
    if l.node_rank >= l.nnodes {
        bail!("--node-rank {} must be below --nnodes {}", l.node_rank, l.nnodes);
    }
    if l.nnodes > 1 && (l.master_addr.is_none() || l.master_port.is_none()) {
        bail!("with --nnodes {} every node needs --master-addr and --master-port (node 0's address and a port open on it)", l.nnodes);
    }
    let timeout = dist::env::timeout()?;
    let addr = l.master_addr.clone().unwrap_or_else(|| "127.0.0.1".into());
    // node 0 hosts the store for the whole job, across restarts
    let store = if l.node_rank == 0 {
        Some(dist::Store::server(&addr, l.master_port.unwrap_or(0), timeout).context("the launcher's rendezvous store")?)
    } else {
        None
    };
    let port = match &store {
        Some(s) => s.port()?,
        None => l.master_port.unwrap_or(0),
    };
    let world = nproc * l.nnodes;
    let exe = std::env::current_exe().context("locating the train binary")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads = std::env::var("OMP_NUM_THREADS").ok().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / nproc).max(1).to_string()
    });
    let run_id = format!("whet-{}", std::process::id());
    eprintln!("whet launcher: {world} rank(s) ({nproc} per node × {} node(s)), rendezvous {addr}:{port}, {threads} thread(s) per rank", l.nnodes);
    for attempt in 0..=l.max_restarts {
        let mut children: Vec<(usize, Child)> = vec![];
        let mut relays = vec![];
        for local in 0..nproc {
            let rank = l.node_rank * nproc + local;
            let mut c = Command::new(&exe);
            c.args(worker_args(&args, attempt > 0))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", nproc.to_string())
                .env("GROUP_RANK", l.node_rank.to_string())
                .env("GROUP_WORLD_SIZE", l.nnodes.to_string())
                .env("ROLE_RANK", rank.to_string())
                .env("ROLE_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", &addr)
                .env("MASTER_PORT", port.to_string())
                .env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .env("TORCHELASTIC_RESTART_COUNT", attempt.to_string())
                .env("TORCHELASTIC_MAX_RESTARTS", l.max_restarts.to_string())
                .env("TORCHELASTIC_RUN_ID", &run_id)
                .env("OMP_NUM_THREADS", &threads);
            // SAFETY: prctl in the child before exec; a worker dies with its launcher.
            unsafe {
                c.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = c.spawn().with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
            relays.push(relay(child.stdout.take(), rank, false));
            relays.push(relay(child.stderr.take(), rank, true));
            children.push((rank, child));
        }
        let outcome = supervise(&mut children);
        for r in relays.drain(..) {
            let _ = r.join();
        }
        match outcome? {
            None => return Ok(()),
            Some(failure) if attempt < l.max_restarts => {
                eprintln!("whet launcher: {failure}; restarting from the latest checkpoint (restart {} of {})", attempt + 1, l.max_restarts);
            }
            Some(failure) => {
                let hint = if l.max_restarts == 0 { " (--max-restarts R restarts from the latest checkpoint)" } else { "" };
                bail!("{failure}; no restarts left{hint}");
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Copies a rank's output to ours line by line, each line in one write, so that the ranks' lines never
/// interleave mid-line; lines of ranks other than 0 are prefixed with `[rank N] `.
fn relay(from: Option<impl Read + Send + 'static>, rank: usize, to_stderr: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(from) = from else { return };
        let prefix = if rank == 0 { String::new() } else { format!("[rank {rank}] ") };
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let mut buf = Vec::with_capacity(prefix.len() + line.len() + 1);
            buf.extend_from_slice(prefix.as_bytes());
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            let _ = if to_stderr { std::io::stderr().lock().write_all(&buf) } else { std::io::stdout().lock().write_all(&buf) };
        }
    })
}

/// Waits for the ranks; on the first failure kills the rest. Returns what failed (None: all succeeded).
fn supervise(children: &mut [(usize, Child)]) -> Result<Option<String>> {
    let mut running = children.len();
    let mut done = vec![false; children.len()];
    while running > 0 {
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                done[i] = true;
                running -= 1;
                if !status.success() {
                    let msg = format!("rank {rank} (pid {}) {}", child.id(), describe(status));
                    let t0 = Instant::now();
                    let mut stopped = 0;
                    for (j, (_, other)) in children.iter_mut().enumerate() {
                        if !done[j] {
                            let _ = other.kill();
                            let _ = other.wait();
                            stopped += 1;
                        }
                    }
                    return Ok(Some(format!("{msg}; stopped the other {stopped} rank(s) in {:.1} s", t0.elapsed().as_secs_f64())));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(None)
}

/// The communicator of this process and the device it trains on: a worker of a data-parallel job when
/// torchrun's variables are set (on GPUs: `cuda:LOCAL_RANK` with NCCL), else a single process.
pub fn join(device: tch::Device) -> Result<(Box<dyn dist::Communicator>, tch::Device)> {
    let env = dist::WorkerEnv::read()?;
    let Some(e) = env else { return Ok((Box::new(dist::Single), device)) };
    let (device, nccl) = match device {
        tch::Device::Cuda(_) if cfg!(feature = "nccl") => (tch::Device::Cuda(e.local_rank), Some(e.local_rank)),
        tch::Device::Cuda(_) if e.world > 1 => bail!("data parallelism on GPUs needs a build with `--features nccl` (after `scripts/libtorch.sh cuda`)"),
        d => (d, None),
    };
    let comm = dist::from_env(nccl).with_context(|| format!("rank {} of {} joining the job at {}:{}", e.rank, e.world, e.master_addr, e.master_port))?;
    if comm.world() > 1 {
        eprintln!("whet: rank {} of {} (local rank {}), {} backend, device {device:?}", comm.rank(), comm.world(), comm.local_rank(), comm.backend());
    }
    Ok((comm, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_our_arguments_without_the_launchers() {
        let a: Vec<String> = "--recipe r.toml --nproc-per-node 2 --max-restarts=1 --master-port 5 --resume never --set a=b".split(' ').map(String::from).collect();
        assert_eq!(worker_args(&a, false).join(" "), "--recipe r.toml --resume never --set a=b");
        assert_eq!(worker_args(&a, true).join(" "), "--recipe r.toml --set a=b --resume auto");
    }

    #[test]
    fn exit_statuses_read_plainly() {
        assert_eq!(describe(ExitStatus::from_raw(9)), "was killed by signal 9 (SIGKILL)");
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exited with status 1");
    }
}
