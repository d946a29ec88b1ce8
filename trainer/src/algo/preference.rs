//! Pairwise preference losses, all written in terms of h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))
//! for a chosen reply c and a rejected reply r:
//!
//! - `sigmoid` (DPO, Rafailov et al. 2023, arXiv 2305.18290): −log σ(βh); with label smoothing ε (cDPO,
//!   Mitchell 2023): −(1−ε) log σ(βh) − ε log σ(−βh).
//! - `ipo` (Azar et al. 2023, arXiv 2310.12036): (h − 1/(2β))², with h on per-token averaged log-probabilities
//!   (as TRL computes it).
//! - `hinge` (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425): max(0, 1 − βh).

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The pairwise loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DPO: −log σ(βh) (with label smoothing: cDPO).
    #[default]
    Sigmoid,
    /// IPO: (h − 1/(2β))² on per-token averaged log-probabilities.
    Ipo,
    /// SLiC hinge: max(0, 1 − βh).
    Hinge,
}

/// A pairwise loss and its constants.
#[derive(Debug, Clone, Copy)]
pub struct PairLoss {
    pub kind: LossType,
    /// β (IPO's τ).
    pub beta: f64,
    /// cDPO's ε (sigmoid only).
    pub label_smoothing: f64,
}

/// Per-pair losses and implicit rewards from policy (`pc`, `pr`) and reference (`rc`, `rr`) sequence
/// log-probabilities `[P]` (sums or per-token means, as the caller chose). Returns (loss `[P]`, chosen reward
/// β(pc − rc) `[P]`, rejected reward β(pr − rr) `[P]`).
pub fn pair_losses(pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor, a: &PairLoss) -> (Tensor, Tensor, Tensor) {
    let chosen = pc - rc;
    let rejected = pr - rr;
    let h = &chosen - &rejected;
    let beta = a.beta;
    let loss = match a.kind {
        // Rafailov et al. 2023, eq. 7; cDPO label smoothing.
        LossType::Sigmoid => {
            let eps = a.label_smoothing;
            let pos = -(&h * beta).log_sigmoid() * (1.0 - eps);
            if eps > 0.0 {
                pos - (&h * -beta).log_sigmoid() * eps
            } else {
                pos
            }
        }
        // Azar et al. 2023, eq. 17: (h − 1/(2τ))².
        LossType::Ipo => (&h - 1.0 / (2.0 * beta)).square(),
        // SLiC-HF (Zhao et al. 2023): max(0, δ − βh) with δ = 1.
        LossType::Hinge => (-(&h * beta) + 1.0).relu(),
    };
    (loss, chosen.detach() * beta, rejected.detach() * beta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn args(kind: LossType, beta: f64, label_smoothing: f64) -> PairLoss {
        PairLoss { kind, beta, label_smoothing }
    }

    // fixed log-probabilities: (policy chosen, policy rejected, ref chosen, ref rejected)
    const LP: [(f64, f64, f64, f64); 4] = [(-12.0, -15.0, -13.0, -14.0), (-3.5, -2.0, -3.0, -2.5), (-40.0, -41.0, -40.0, -41.0), (-7.25, -30.0, -9.0, -20.0)];

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v)
    }

    fn losses(a: &PairLoss) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| t(&LP.iter().map(f).collect::<Vec<_>>());
        let (l, c, r) = pair_losses(&col(|x| x.0), &col(|x| x.1), &col(|x| x.2), &col(|x| x.3), a);
        (Vec::try_from(l).unwrap(), Vec::try_from(c).unwrap(), Vec::try_from(r).unwrap())
    }

    fn log_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()), "{a} != {b}");
    }

    #[test]
    fn sigmoid_loss_is_rafailov_eq7() {
        for beta in [0.1, 0.5, 2.0] {
            let (l, c, r) = losses(&args(LossType::Sigmoid, beta, 0.0));
            for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
                let logits = beta * ((pc - rc) - (pr - rr));
                close(l[i], -log_sigmoid(logits));
                close(c[i], beta * (pc - rc));
                close(r[i], beta * (pr - rr));
            }
        }
    }

    #[test]
    fn label_smoothed_sigmoid_is_cdpo() {
        let (beta, eps) = (0.3, 0.2);
        let (l, _, _) = losses(&args(LossType::Sigmoid, beta, eps));
        for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
            let h = (pc - rc) - (pr - rr);
            close(l[i], -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h));
        }
    }

    #[test]
    fn ipo_loss_is_azar_eq17() {
        let beta = 0.25;
        let (l, _, _) = losses(&args(LossType::Ipo, beta, 0.0));
        for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
            let h = (pc - rc) - (pr - rr);
            close(l[i], (h - 1.0 / (2.0 * beta)).powi(2));
        }
        // the minimum sits at h = 1/(2β)
        let a = args(LossType::Ipo, beta, 0.0);
        let (l, _, _) = pair_losses(&t(&[2.0]), &t(&[0.0]), &t(&[0.0]), &t(&[0.0]), &a);
        assert_eq!(l.double_value(&[0]), 0.0);
    }

    #[test]
    fn hinge_loss_is_slic() {
        let beta = 0.5;
        let (l, _, _) = losses(&args(LossType::Hinge, beta, 0.0));
        for (i, &(pc, pr, rc, rr)) in LP.iter().enumerate() {
            let h = (pc - rc) - (pr - rr);
            close(l[i], (1.0 - beta * h).max(0.0));
        }
        // pair 3 has βh = 0.5·12.95 > 1: no loss
        assert_eq!(l[3], 0.0);
    }

    #[test]
    fn sigmoid_gradient_matches_the_closed_form() {
        // d/dpc of −log σ(β h) = −β σ(−β h)
        let beta = 0.4;
        let pc = t(&[-5.0]).set_requires_grad(true);
        let (l, _, _) = pair_losses(&pc, &t(&[-6.0]), &t(&[-5.5]), &t(&[-5.0]), &args(LossType::Sigmoid, beta, 0.0));
        l.sum(Kind::Double).backward();
        let h: f64 = (-5.0 + 5.5) - (-6.0 + 5.0);
        let want = -beta / (1.0 + (beta * h).exp());
        close(pc.grad().double_value(&[0]), want);
    }
}
