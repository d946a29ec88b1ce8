//! Reward plugins: native Rust rewards registered by name, long-running child processes
//! speaking JSON lines (`exec`), and HTTP endpoints (`http`). See the README for the protocol.

pub mod exec;
pub mod http;
pub mod protocol;

use crate::reward::{BatchContext, RewardError, RewardFn, RewardOutput, Sample};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

fn one() -> f64 {
    1.0
}
fn sixty() -> f64 {
    60.0
}
fn two() -> u32 {
    2
}
fn five() -> u32 {
    5
}

/// How a plugin is reached.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A Rust reward registered in a [`PluginRegistry`].
    Native,
    /// A child process reading requests on stdin and writing responses on stdout (JSON lines).
    Exec,
    /// A URL receiving the request as a JSON POST.
    Http,
}

/// What to do when a plugin fails on a batch (after its retries).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Fail the training step with the plugin's error.
    #[default]
    Fail,
    /// Give every sample of the batch `failure_reward` and report `failed = 1` in the metrics.
    Fixed,
}

/// `kind = "plugin"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Weight in the total reward.
    #[serde(default = "one")]
    pub weight: f64,
    /// Plugin name (metrics prefix; for `native`, the registry key).
    pub name: String,
    /// `native`, `exec` or `http`.
    pub transport: Transport,
    /// exec: the program and its arguments, e.g. `["python3", "plugins/length_plugin.py"]`.
    #[serde(default)]
    pub command: Vec<String>,
    /// exec: extra environment variables for the child.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// http: the URL to POST to.
    #[serde(default)]
    pub url: Option<String>,
    /// Seconds to wait for one batch's response.
    #[serde(default = "sixty")]
    pub timeout_s: f64,
    /// Extra attempts per batch after a failure (exec restarts the process for each).
    #[serde(default = "two")]
    pub retries: u32,
    /// exec: restarts in a row without a successful batch before the plugin is considered dead.
    #[serde(default = "five")]
    pub max_restarts: u32,
    /// `fail` (default) or `fixed`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// The reward given to every sample of a failed batch when `on_failure = "fixed"`.
    #[serde(default)]
    pub failure_reward: f64,
    /// Free-form parameters passed to the plugin (in every request, and to native factories).
    #[serde(default)]
    pub params: Value,
}

/// A plugin transport: sends one batch request, returns one output per sample.
pub trait Backend: Send + Sync {
    fn call(&self, request: &Value, n: usize, batch_id: u64) -> Result<Vec<RewardOutput>, String>;
    /// Process restarts so far (exec only).
    fn restarts(&self) -> u64 {
        0
    }
}

type Factory = Box<dyn Fn(&Value) -> Result<Box<dyn RewardFn>, RewardError> + Send + Sync>;

/// Native reward plugins by name.
#[derive(Default)]
pub struct PluginRegistry {
    factories: HashMap<String, Factory>,
}

impl PluginRegistry {
    /// Register a factory called with the recipe's `params`.
    pub fn register<F>(&mut self, name: &str, factory: F)
    where
        F: Fn(&Value) -> Result<Box<dyn RewardFn>, RewardError> + Send + Sync + 'static,
    {
        self.factories.insert(name.to_string(), Box::new(factory));
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.factories.keys().cloned().collect();
        v.sort();
        v
    }

    fn build(&self, name: &str, params: &Value) -> Result<Box<dyn RewardFn>, RewardError> {
        match self.factories.get(name) {
            Some(f) => f(params),
            None => Err(RewardError::Config(format!("native plugin {name:?} is not registered (registered: {:?})", self.names()))),
        }
    }
}

/// Build the reward function for a plugin entry.
pub fn build_plugin(cfg: &PluginConfig, registry: &PluginRegistry) -> Result<Box<dyn RewardFn>, RewardError> {
    if cfg.name.trim().is_empty() {
        return Err(RewardError::Config("plugin: `name` must not be empty".into()));
    }
    if !(cfg.timeout_s > 0.0 && cfg.timeout_s.is_finite()) {
        return Err(RewardError::Config(format!("plugin {:?}: timeout_s must be a positive number", cfg.name)));
    }
    let backend: Box<dyn Backend> = match cfg.transport {
        Transport::Native => return registry.build(&cfg.name, &cfg.params),
        Transport::Exec => {
            if cfg.command.is_empty() {
                return Err(RewardError::Config(format!("plugin {:?}: transport \"exec\" needs `command`", cfg.name)));
            }
            Box::new(exec::ExecBackend::new(cfg.clone()))
        }
        Transport::Http => {
            let Some(url) = &cfg.url else { return Err(RewardError::Config(format!("plugin {:?}: transport \"http\" needs `url`", cfg.name))) };
            Box::new(http::HttpBackend::new(&cfg.name, url, cfg.timeout_s, cfg.retries).map_err(|e| RewardError::Config(format!("plugin {:?}: {e}", cfg.name)))?)
        }
    };
    Ok(Box::new(RemotePlugin { cfg: cfg.clone(), backend, batches: AtomicU64::new(0) }))
}

/// An exec or http plugin with its failure policy.
pub struct RemotePlugin {
    pub cfg: PluginConfig,
    backend: Box<dyn Backend>,
    batches: AtomicU64,
}

impl RewardFn for RemotePlugin {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn score(&self, samples: &[Sample], _ctx: &BatchContext) -> Result<Vec<RewardOutput>, RewardError> {
        let batch_id = self.batches.fetch_add(1, Ordering::Relaxed);
        let req = protocol::request(&self.cfg.name, batch_id, samples, &self.cfg.params);
        match self.backend.call(&req, samples.len(), batch_id) {
            Ok(mut out) => {
                for o in &mut out {
                    o.metrics.push(("failed".into(), 0.0));
                    o.metrics.push(("restarts".into(), self.backend.restarts() as f64));
                }
                Ok(out)
            }
            Err(msg) => match self.cfg.on_failure {
                OnFailure::Fail => Err(RewardError::Plugin { name: self.cfg.name.clone(), message: msg }),
                OnFailure::Fixed => {
                    eprintln!("[reward plugin {}] batch {batch_id} failed, using failure_reward {}: {msg}", self.cfg.name, self.cfg.failure_reward);
                    Ok(samples
                        .iter()
                        .map(|_| RewardOutput { reward: Some(self.cfg.failure_reward), metrics: vec![("failed".into(), 1.0), ("restarts".into(), self.backend.restarts() as f64)] })
                        .collect())
                }
            },
        }
    }
}
