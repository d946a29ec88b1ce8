#!/usr/bin/env python3
"""GRPO step time, whet against TRL's GRPOTrainer, side by side in one run on the same model files and prompts.

Uses ../shared/bench/trl (its assets: random-init Qwen2 "tiny" 4M and "small" 26M, ChatML tokenizer, arithmetic
problems) and its venv (/tmp/trl-venv) for the TRL side. Shape (the harness's): 4 prompts x 8 generations of
exactly 128 tokens at temperature 1.0, one optimizer step per generation round, AdamW lr 1e-6, fp32, KL
coefficient 0.04 (a reference model) and 0 (none), 2 torch threads on both sides; TRL without vLLM. Reports the
median step time and its split into generation, scoring (reward + reference log-probs) and training.

    python3 scripts/bench/grpo.py [--rounds 1] [--steps 5] [--models tiny,small] [--betas 0.04,0.0]

Needs target/release/train (cargo build --release -p trainer).
"""
import argparse
import statistics
import sys

from common import ensure_assets, run_trl, run_whet

RECIPE = """
[model]
path = "{assets}/models/{model}"
tokenizer = "{assets}/tokenizer"
device = "cpu"
[run]
output_dir = "{{out}}"
threads = 2
log_every = 1
[[stage]]
kind = "grpo"
data = {{ path = "{assets}/data/problems.jsonl", prompt = "prompt", answer = "answer", limit = {rows} }}
max_steps = {steps}
prompts_per_step = 4
num_generations = 8
max_completion_length = 128
ignore_eos = true
temperature = 1.0
lr = 1e-6
schedule = "constant"
kl_coef = {beta}
micro_batch_size = 32
reward = [{{ kind = "accuracy", correct = 1.0, incorrect = 0.0, no_answer = 0.0 }}]
"""


def whet(assets, model, beta, warmup, steps):
    rows = run_whet(RECIPE.format(assets=assets, model=model, rows=4 * (warmup + steps), steps=warmup + steps, beta=beta), "reward_mean")
    rows = [r for r in rows if r["step"] > warmup]
    med = lambda k: statistics.median(r[k] for r in rows)
    return med("step_s"), med("time_generate_s"), med("time_score_s"), med("time_train_s")


def trl(assets, model, beta, warmup, steps):
    r = run_trl(["--family", "grpo", "--models", model, "--assets", assets, "--warmup", str(warmup), "--steps", str(steps), "--grpo-betas", str(beta)])
    s, sp = r["summary"], r["split"]
    return s["step_s_median"], sp["generate_s_median"], sp["score_s_median"], sp["train_s_median"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="/tmp/bench-assets")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--betas", default="0.04,0.0")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    ensure_assets(a.assets)
    print("| model | kl | round | whet s/step (gen / score / train) | TRL s/step (gen / score / train) | ratio |")
    print("|---|---:|---:|---|---|---:|")
    for model in a.models.split(","):
        for beta in [float(b) for b in a.betas.split(",")]:
            for rnd in range(a.rounds):
                w = whet(a.assets, model, beta, a.warmup, a.steps)
                t = trl(a.assets, model, beta, a.warmup, a.steps)
                f = lambda x: f"{x[0]:.2f} ({x[1]:.2f} / {x[2]:.2f} / {x[3]:.2f})"
                print(f"| {model} | {beta} | {rnd + 1} | {f(w)} | {f(t)} | {t[0] / w[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
