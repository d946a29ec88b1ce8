//! `train smoke`: a tiny random Llama, greedy decoding with the KV cache checked against full forwards.

use anyhow::{ensure, Result};
use model::{Batch, KvCache, Model, ModelConfig};
use tch::{Device, IndexOp, Kind, Tensor};

pub fn run(device: Device, tokens: i64, seed: i64) -> Result<()> {
    let cfg = ModelConfig::from_json(
        serde_json::json!({
            "model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": true
        }),
        "<smoke config>",
    )?;
    let t0 = std::time::Instant::now();
    let m = Model::random(&cfg, Kind::Float, device, seed);
    eprintln!("built a random {}-parameter llama in {:.2} s", m.net.params.numel(), t0.elapsed().as_secs_f64());
    let prompt: Vec<i64> = (0..8).map(|i| (i * 37 + seed) % 512).collect();
    let (b, cap) = (1, prompt.len() as i64 + tokens);
    let mut cache = KvCache::new(&cfg, b, cap, Kind::Float, device);
    let mut seq = prompt.clone();
    let t1 = std::time::Instant::now();
    tch::no_grad(|| -> Result<()> {
        let ids = Tensor::from_slice(&prompt).unsqueeze(0).to(device);
        let n = prompt.len() as i64;
        let pos = Tensor::arange(n, (Kind::Int64, device)).unsqueeze(0);
        let mut mask = Tensor::ones([1, n], (Kind::Int64, device));
        let mut logits = m.net.forward_cached(&ids, &pos, &mask, &mut cache);
        for step in 0..tokens {
            let next = logits.i((0, -1)).argmax(0, false).int64_value(&[]);
            seq.push(next);
            if step + 1 == tokens {
                break;
            }
            mask = Tensor::ones([1, cache.len() + 1], (Kind::Int64, device));
            let pos = Tensor::from_slice(&[cache.len()]).unsqueeze(0).to(device);
            logits = m.net.forward_cached(&Tensor::from_slice(&[next]).unsqueeze(0).to(device), &pos, &mask, &mut cache);
        }
        Ok(())
    })?;
    let dt = t1.elapsed().as_secs_f64();
    // The same greedy continuation from full forward passes (no cache) must agree.
    let check = tch::no_grad(|| {
        let ids = Tensor::from_slice(&seq[..seq.len() - 1]).unsqueeze(0).to(device);
        let logits = m.net.forward(&Batch::causal(&ids));
        let argmax: Vec<i64> = Vec::try_from(logits.i(0).argmax(-1, false).to(Device::Cpu)).unwrap();
        argmax[prompt.len() - 1..].to_vec()
    });
    ensure!(check == seq[prompt.len()..], "KV-cached decoding disagrees with full forward passes");
    println!("prompt    {:?}", prompt);
    println!("generated {:?}", &seq[prompt.len()..]);
    println!("smoke OK: {tokens} tokens in {dt:.2} s ({:.0} tok/s), KV cache agrees with full forwards", tokens as f64 / dt);
    Ok(())
}
