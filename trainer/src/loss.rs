//! Token losses computed in chunks, so that full fp32 `[batch, sequence, vocabulary]` logits never exist.
//!
//! The hidden states of the positions that carry a loss are gathered ([N, hidden]) and detached; each chunk of
//! rows is projected to logits, its cross-entropy back-propagated (accumulating into the detached hidden
//! states' gradient and the output projection's gradient) and freed; finally the gathered gradient is pushed
//! through the network with the identity ∂(Σ h·G)/∂θ = Gᵀ ∂h/∂θ.

use model::{Batch, Transformer};
use tch::{Kind, Reduction, Tensor};

/// Positions whose label is this carry no loss (Hugging Face convention).
pub const IGNORE: i64 = -100;

/// Logits in at least fp32 (bf16/fp16 models), double kept as is.
fn upcast(x: Tensor) -> Tensor {
    if x.kind() == Kind::Double {
        x
    } else {
        x.to_kind(Kind::Float)
    }
}

/// Next-token cross-entropy of `labels` `[B, T]` (aligned with the inputs, shifted here), multiplied by
/// `scale`, back-propagated into the model's parameters. Returns (sum of token losses, number of tokens),
/// unscaled.
pub fn causal_lm_backward(net: &Transformer, batch: &Batch, labels: &Tensor, scale: f64, chunk_rows: i64) -> (f64, i64) {
    let hidden = net.hidden_states(batch);
    let (b, t, h) = hidden.size3().unwrap();
    let hs = hidden.narrow(1, 0, t - 1).reshape([b * (t - 1), h]);
    let ys = labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]).to_device(hidden.device());
    let idx = ys.ne(IGNORE).nonzero().squeeze_dim(1);
    let n = idx.size()[0];
    if n == 0 {
        return (0.0, 0);
    }
    let sel = hs.index_select(0, &idx);
    let ysel = ys.index_select(0, &idx);
    let detached = sel.detach().set_requires_grad(true);
    let w = net.lm_head_weight();
    let mut total = 0.0;
    let chunk = chunk_rows.max(1);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = upcast(detached.narrow(0, start, len).linear(w, None::<Tensor>));
        let loss = logits.cross_entropy_loss::<Tensor>(&ysel.narrow(0, start, len), None, Reduction::Sum, IGNORE, 0.0);
        total += loss.double_value(&[]);
        (loss * scale).backward();
        start += len;
    }
    let g = detached.grad();
    (sel * g).sum(Kind::Float).backward();
    (total, n)
}

/// Sum of next-token log-probabilities of the labelled tokens per row, without gradients: `[B]`, plus the
/// token count per row. Used for held-out loss and (later) reference log-probabilities.
pub fn sequence_logprobs(net: &Transformer, batch: &Batch, labels: &Tensor, chunk_rows: i64) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let hidden = net.hidden_states(batch);
        let (b, t, h) = hidden.size3().unwrap();
        let hs = hidden.narrow(1, 0, t - 1).reshape([b * (t - 1), h]);
        let ys = labels.narrow(1, 1, t - 1).reshape([b * (t - 1)]).to_device(hidden.device());
        let valid = ys.ne(IGNORE);
        let safe = ys.clamp_min(0);
        let w = net.lm_head_weight();
        let n = b * (t - 1);
        let mut parts = vec![];
        let mut start = 0;
        while start < n {
            let len = chunk_rows.max(1).min(n - start);
            let logits = upcast(hs.narrow(0, start, len).linear(w, None::<Tensor>));
            let logp = logits.log_softmax(-1, logits.kind());
            parts.push(logp.gather(1, &safe.narrow(0, start, len).unsqueeze(1), false).squeeze_dim(1));
            start += len;
        }
        let lp = Tensor::cat(&parts, 0);
        let lp = (&lp * valid.to_kind(lp.kind())).reshape([b, t - 1]).sum_dim_intlist(1, false, lp.kind());
        let cnt = valid.reshape([b, t - 1]).sum_dim_intlist(1, false, Kind::Int64);
        (lp, cnt)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Fill, ModelConfig};
    use tch::Device;

    fn tiny() -> Transformer {
        model::runtime::preload_cuda();
        let cfg = ModelConfig::from_json(
            serde_json::json!({"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": true}),
            "test",
        )
        .unwrap();
        tch::manual_seed(3);
        let mut net = Transformer::build(&cfg, Kind::Double, Device::Cpu, Fill::Normal(0.3));
        net.params.set_requires_grad(true);
        net
    }

    #[test]
    fn chunked_loss_and_gradients_equal_the_plain_formula() {
        let net = tiny();
        let ids = Tensor::from_slice(&[5i64, 7, 9, 11, 3, 4, 8, 2, 6, 1, 10, 12]).view([2, 6]);
        let labels = Tensor::from_slice(&[-100i64, -100, 9, 11, 3, -100, -100, 8, 2, 6, 1, 10]).view([2, 6]);
        let batch = Batch::causal(&ids);
        // chunked, scaled by 1/n
        let (sum, n) = causal_lm_backward(&net, &batch, &labels, 1.0 / 8.0, 3);
        assert_eq!(n, 8);
        let g1: Vec<Tensor> = net.params.tensors().iter().map(|p| p.grad().copy()).collect();
        for p in net.params.tensors() {
            let _ = p.grad().zero_();
        }
        // reference: full logits, mean cross-entropy over labelled next tokens
        let logits = net.forward(&batch);
        let lg = logits.narrow(1, 0, 5).reshape([10, 50]);
        let y = labels.narrow(1, 1, 5).reshape([10]);
        let loss = lg.cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, IGNORE, 0.0);
        assert!((loss.double_value(&[]) - sum / 8.0).abs() < 1e-10);
        loss.backward();
        for (a, p) in g1.iter().zip(net.params.tensors()) {
            let d = (a - p.grad()).abs().max().double_value(&[]);
            assert!(d < 1e-10, "gradient differs by {d}");
        }
        // sequence log-probs agree with the loss
        let (lp, cnt) = sequence_logprobs(&net, &batch, &labels, 4);
        assert!((lp.sum(Kind::Double).double_value(&[]) + sum).abs() < 1e-9);
        assert_eq!(Vec::<i64>::try_from(cnt).unwrap(), vec![3, 5]);
    }
}
