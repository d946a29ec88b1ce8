//! What the engine tests share: set-up, the model crate's fixtures, deterministic prompts and the references
//! they compare against.
#![allow(dead_code)]

use model::{Batch, Model};
use std::path::PathBuf;
use tch::{Device, Tensor};

pub fn setup() {
    model::runtime::preload_cuda();
    tch::set_num_threads(1);
}

/// A fixture model (`model/tests/fixtures/<name>`) on `device`.
pub fn load_on(name: &str, device: Device) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures").join(name);
    Model::load(&dir, None, device).unwrap()
}

pub fn load(name: &str) -> Model {
    load_on(name, Device::Cpu)
}

/// Deterministic prompts of different lengths (ids within the fixtures' 256-token vocabulary).
pub fn prompt(len: usize, salt: i64) -> Vec<i64> {
    (0..len as i64).map(|i| (i * 37 + salt * 11 + 5) % 250 + 3).collect()
}

/// Greedy decoding by full forwards: argmax at the last position, appended, repeated.
pub fn reference_greedy(m: &Model, prompt: &[i64], steps: usize, rope_long: bool) -> Vec<i64> {
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let t = Tensor::from_slice(&ids).view([1, -1]);
        let l = tch::no_grad(|| m.net.forward(&Batch { rope_long: Some(rope_long), ..Batch::causal(&t) }));
        let next = l.select(1, -1).argmax(-1, false).int64_value(&[0]);
        out.push(next);
        ids.push(next);
    }
    out
}

/// Token `i` decodes to two letters, so substrings can span token boundaries.
pub fn two_letter(ids: &[i64]) -> String {
    ids.iter().map(|&i| format!("{}{}", (b'a' + (i % 26) as u8) as char, (b'A' + ((i / 26) % 26) as u8) as char)).collect()
}
