//! Crash injection for the resume tests: when the environment variable `WHET_TEST_KILL` names the point the
//! run has reached (e.g. `step:0:8`, `ckpt-write:0:6`, `after-ckpt:0:3`, `after-final:0`), the process sends
//! itself SIGKILL — no destructors, no flushing, exactly like an OOM kill or a lost node.

pub fn point(name: &str) {
    // Data parallel: `WHET_TEST_KILL_RANK` picks the rank that dies; a restarted job does not die again.
    let var = |k: &str| std::env::var(k).ok();
    if var("WHET_TEST_KILL_RANK").is_some_and(|r| var("RANK").unwrap_or_else(|| "0".into()) != r) || var("TORCHELASTIC_RESTART_COUNT").is_some_and(|c| c != "0") {
        return;
    }
    if let Some(want) = std::env::var_os("WHET_TEST_KILL") {
        if want.to_str() == Some(name) {
            eprintln!("WHET_TEST_KILL: killing at {name}");
            // SAFETY: signalling our own process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
