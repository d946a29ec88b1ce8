//! torchrun's environment contract: a process that finds `RANK` and `WORLD_SIZE` set is a worker of a
//! data-parallel job (under torchrun `--no-python`, whet's own launcher, a SLURM wrapper or a Kubernetes
//! PyTorchJob) and joins it through the store at `MASTER_ADDR:MASTER_PORT`.
//!
//! Who hosts the store: with `TORCHELASTIC_USE_AGENT_STORE=True` the agent (torchrun or whet's launcher)
//! does and every rank is a client; otherwise rank 0 hosts it (SLURM, Kubernetes). Keys live under
//! `/worker/attempt_{TORCHELASTIC_RESTART_COUNT}/`, torchrun's prefix, so a restarted job never reads the
//! keys of a failed attempt.

use std::time::Duration;

use crate::{C10d, Communicator, DistError, Result, Single, Store};

/// The variables a worker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The agent hosts the store (torchrun, whet's launcher).
    pub agent_store: bool,
    pub restart_count: usize,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(name: &str, default: Option<T>) -> Result<T> {
    match var(name) {
        Some(v) => v.parse().map_err(|_| DistError(format!("environment variable {name}={v:?} is not a valid number"))),
        None => default.ok_or_else(|| DistError(format!("environment variable {name} is not set (a data-parallel worker needs RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"))),
    }
}

impl WorkerEnv {
    /// None when `WORLD_SIZE` is not set (a plain single process).
    pub fn read() -> Result<Option<WorkerEnv>> {
        if var("WORLD_SIZE").is_none() && var("RANK").is_none() {
            return Ok(None);
        }
        let world: usize = parse("WORLD_SIZE", None)?;
        let rank: usize = parse("RANK", None)?;
        if world == 0 || rank >= world {
            return Err(DistError(format!("RANK={rank} must be below WORLD_SIZE={world}")));
        }
        let e = WorkerEnv {
            rank,
            world,
            local_rank: parse("LOCAL_RANK", Some(rank))?,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: if world > 1 { parse("MASTER_PORT", None)? } else { parse("MASTER_PORT", Some(0))? },
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            restart_count: parse("TORCHELASTIC_RESTART_COUNT", Some(0))?,
        };
        Ok(Some(e))
    }

    /// The key prefix of this attempt.
    pub fn prefix(&self) -> String {
        format!("/worker/attempt_{}/", self.restart_count)
    }
}

/// Collective timeout: `WHET_DIST_TIMEOUT_S` seconds (default 1800, torch's default process-group timeout).
pub fn timeout() -> Result<Duration> {
    Ok(Duration::from_secs_f64(parse("WHET_DIST_TIMEOUT_S", Some(1800.0f64))?.max(0.001)))
}

/// The communicator the environment asks for: [`Single`] without `WORLD_SIZE` (or with a world of 1 and
/// no store to join), else a [`C10d`] member of the job. `nccl_device`: the CUDA device to run NCCL on
/// (None on CPU).
pub fn from_env(nccl_device: Option<usize>) -> Result<Box<dyn Communicator>> {
    let Some(e) = WorkerEnv::read()? else { return Ok(Box::new(Single)) };
    if e.world == 1 && nccl_device.is_none() && !e.agent_store && e.master_port == 0 {
        return Ok(Box::new(Single));
    }
    let timeout = timeout()?;
    let store = if e.agent_store || e.rank != 0 {
        Store::client(&e.master_addr, e.master_port, timeout)?
    } else {
        Store::server(&e.master_addr, e.master_port, timeout)?
    };
    let c = C10d::new(store, &e.prefix(), e.rank, e.world, e.local_rank, nccl_device, timeout)?;
    Ok(Box::new(c))
}
