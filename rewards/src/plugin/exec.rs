//! `transport = "exec"`: a long-running child process speaking JSON lines.
//!
//! One request line per batch on the child's stdin, one response line on its stdout; the child's
//! stderr is forwarded to our stderr prefixed with the plugin name. A batch waits at most
//! `timeout_s`; a crash, a hang, malformed output or a wrong number of rewards kills the child,
//! and the next attempt starts a fresh one (at most `retries` extra attempts per batch and
//! `max_restarts` restarts over the plugin's life). Nothing here can block training forever.

use super::protocol::parse_response;
use super::{Backend, PluginConfig};
use crate::reward::RewardOutput;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

struct Proc {
    child: Child,
    /// Requests go through a writer thread, so a child that stops reading cannot block us on a
    /// full pipe.
    requests: Sender<String>,
    lines: Receiver<std::io::Result<String>>,
}

impl Proc {
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct State {
    proc: Option<Proc>,
    /// Processes started so far.
    starts: u64,
    /// Restarts since the last successful batch.
    failing_restarts: u64,
}

/// The exec transport.
pub struct ExecBackend {
    cfg: PluginConfig,
    state: Mutex<State>,
}

impl ExecBackend {
    pub fn new(cfg: PluginConfig) -> Self {
        ExecBackend { cfg, state: Mutex::new(State { proc: None, starts: 0, failing_restarts: 0 }) }
    }

    fn spawn(&self) -> Result<Proc, String> {
        let mut cmd = Command::new(&self.cfg.command[0]);
        cmd.args(&self.cfg.command[1..]).envs(&self.cfg.env).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {:?}: {e}", self.cfg.command))?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (req_tx, req_rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name(format!("plugin-{}-in", self.cfg.name))
            .spawn(move || {
                for line in req_rx {
                    if stdin.write_all(line.as_bytes()).and_then(|_| stdin.write_all(b"\n")).and_then(|_| stdin.flush()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start writer thread: {e}"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("plugin-{}-out", self.cfg.name))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start reader thread: {e}"))?;
        let name = self.cfg.name.clone();
        std::thread::Builder::new()
            .name(format!("plugin-{}-err", self.cfg.name))
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[reward plugin {name}] {line}");
                }
            })
            .map_err(|e| format!("cannot start stderr thread: {e}"))?;
        Ok(Proc { child, requests: req_tx, lines: rx })
    }

    fn attempt(&self, st: &mut State, line: &str, n: usize, batch_id: u64) -> Result<Vec<RewardOutput>, String> {
        if st.proc.is_none() {
            if st.starts > 0 {
                if st.failing_restarts >= self.cfg.max_restarts as u64 {
                    return Err(format!("gave up: {} restarts without a successful batch (max_restarts = {})", st.failing_restarts, self.cfg.max_restarts));
                }
                st.failing_restarts += 1;
            }
            st.starts += 1;
            st.proc = Some(self.spawn()?);
        }
        let p = st.proc.as_mut().unwrap();
        let sent = p.requests.send(line.to_string());
        let timeout = Duration::from_secs_f64(self.cfg.timeout_s);
        let result = match sent {
            Err(_) => Err("cannot write the request: the process stopped reading".to_string()),
            Ok(()) => match p.lines.recv_timeout(timeout) {
                Ok(Ok(resp)) => parse_response(&resp, n, batch_id),
                Ok(Err(e)) => Err(format!("reading the response: {e}")),
                Err(RecvTimeoutError::Timeout) => Err(format!("no response within {}s", self.cfg.timeout_s)),
                Err(RecvTimeoutError::Disconnected) => {
                    // Give it a moment to exit; never block (it may have closed stdout and kept running).
                    let mut status = None;
                    for _ in 0..20 {
                        if let Ok(Some(s)) = p.child.try_wait() {
                            status = Some(s.to_string());
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(format!("the process closed its output ({}) without a response", status.unwrap_or_else(|| "still running".into())))
                }
            },
        };
        if result.is_ok() {
            st.failing_restarts = 0;
        }
        if result.is_err() {
            // Unknown protocol state: replace the process.
            if let Some(p) = st.proc.take() {
                p.kill();
            }
        }
        result
    }
}

impl Backend for ExecBackend {
    fn call(&self, request: &Value, n: usize, batch_id: u64) -> Result<Vec<RewardOutput>, String> {
        let line = request.to_string();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut errors = Vec::new();
        for _ in 0..=self.cfg.retries {
            match self.attempt(&mut st, &line, n, batch_id) {
                Ok(out) => return Ok(out),
                Err(e) => {
                    eprintln!("[reward plugin {}] batch {batch_id}: {e}", self.cfg.name);
                    let give_up = e.starts_with("gave up") || e.starts_with("cannot start");
                    errors.push(e);
                    if give_up {
                        break;
                    }
                }
            }
        }
        Err(format!("{} attempt(s) failed; last: {}", errors.len(), errors.last().cloned().unwrap_or_default()))
    }

    fn restarts(&self) -> u64 {
        self.state.lock().map(|s| s.starts.saturating_sub(1)).unwrap_or(0)
    }
}

impl Drop for ExecBackend {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            if let Some(p) = st.proc.take() {
                p.kill();
            }
        }
    }
}
