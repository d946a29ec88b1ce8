//! A progress bar with ETA and tokens/s when stderr is a terminal; plain log lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(name: &str, start: usize, total: usize) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar { bar: None };
        }
        let b = ProgressBar::new(total as u64);
        b.set_position(start as u64);
        b.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_prefix(format!("[{name}]"));
        Bar { bar: Some(b) }
    }

    pub fn step(&self, done: usize, loss: f64, tokens_per_s: f64) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            b.set_message(format!("loss {loss:.4}, {tokens_per_s:.0} tok/s"));
        }
    }

    /// A log line that does not tear the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
