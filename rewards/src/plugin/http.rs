//! `transport = "http"`: the request JSON POSTed to a URL, with a timeout and retries.

use super::protocol::parse_response;
use super::Backend;
use crate::reward::RewardOutput;
use serde_json::Value;
use std::time::Duration;

/// The http transport (reqwest, blocking, rustls).
pub struct HttpBackend {
    name: String,
    url: String,
    retries: u32,
    client: reqwest::blocking::Client,
}

impl HttpBackend {
    pub fn new(name: &str, url: &str, timeout_s: f64, retries: u32) -> Result<Self, String> {
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs_f64(timeout_s)).build().map_err(|e| format!("http client: {e}"))?;
        Ok(HttpBackend { name: name.to_string(), url: url.to_string(), retries, client })
    }

    fn attempt(&self, request: &Value, n: usize, batch_id: u64) -> Result<Vec<RewardOutput>, String> {
        let resp = self.client.post(&self.url).json(request).send().map_err(|e| format!("POST {}: {}", self.url, with_causes(&e)))?;
        let status = resp.status();
        let body = resp.text().map_err(|e| format!("reading the response from {}: {e}", self.url))?;
        if !status.is_success() {
            return Err(format!("POST {} returned {status}: {}", self.url, body.chars().take(200).collect::<String>()));
        }
        parse_response(&body, n, batch_id)
    }
}

impl Backend for HttpBackend {
    fn call(&self, request: &Value, n: usize, batch_id: u64) -> Result<Vec<RewardOutput>, String> {
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(50 * (1 << attempt.min(6))));
            }
            match self.attempt(request, n, batch_id) {
                Ok(o) => return Ok(o),
                Err(e) => {
                    eprintln!("[reward plugin {}] batch {batch_id}, attempt {}: {e}", self.name, attempt + 1);
                    last = e;
                }
            }
        }
        Err(format!("{} attempt(s) failed; last: {last}", self.retries + 1))
    }
}

/// An error with the chain of its causes ("error sending request …: … : Connection refused (os error 111)"):
/// reqwest's own message does not say why a connection failed.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
