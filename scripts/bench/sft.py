#!/usr/bin/env python3
"""SFT step time, whet against TRL's SFTTrainer, side by side in one run on the same model files and batch.

Uses ../shared/bench/trl (its assets: random-init Qwen2 "tiny" 4M and "small" 26M, ChatML tokenizer, multi-turn
chats truncated to exactly 256 tokens) and its venv (/tmp/trl-venv, from setup_venv.sh) for the TRL side.
Shape: batch 8 x 256 tokens, no packing, fp32, AdamW lr 1e-4, loss on every token (TRL's default for
conversational data), 2 torch threads on both sides. Runs alternate whet / TRL per model and round.

    python3 scripts/bench/sft.py [--rounds 2] [--steps 8] [--models tiny,small]

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
kind = "sft"
data = {{ path = "{assets}/data/sft_long.jsonl", messages = "messages", limit = {rows} }}
tokenize = {{ max_length = 256, loss_on = "all", truncation = "right" }}
packing = false
max_steps = {steps}
batch_size = 8
lr = 1e-4
schedule = "constant"
max_grad_norm = 1.0
"""


def whet(assets, model, warmup, steps):
    rows = run_whet(RECIPE.format(assets=assets, model=model, rows=8 * (warmup + steps), steps=warmup + steps), "loss")
    times = [r["step_s"] for r in rows if r["step"] > warmup]
    return statistics.median(times), min(times)


def trl(assets, model, warmup, steps):
    s = run_trl(["--family", "sft", "--models", model, "--assets", assets, "--warmup", str(warmup), "--steps", str(steps), "--sft-packing", ""])["summary"]
    return s["step_s_median"], s["step_s_min"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="/tmp/bench-assets")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    ensure_assets(a.assets)
    print("| model | round | whet median s/step | TRL median s/step | whet tok/s | TRL tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in a.models.split(","):
        for rnd in range(a.rounds):
            w, _ = whet(a.assets, model, a.warmup, a.steps)
            t, _ = trl(a.assets, model, a.warmup, a.steps)
            print(f"| {model} | {rnd + 1} | {w:.3f} | {t:.3f} | {2048 / w:.0f} | {2048 / t:.0f} | {t / w:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
