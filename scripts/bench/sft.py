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
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRL = os.path.join(ROOT, "..", "shared", "bench", "trl")
VENV_PY = os.environ.get("TRL_PYTHON", "/tmp/trl-venv/bin/python")

RECIPE = """
[model]
path = "{assets}/models/{model}"
tokenizer = "{assets}/tokenizer"
device = "cpu"
[run]
output_dir = "{out}"
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
    with tempfile.TemporaryDirectory() as d:
        recipe = os.path.join(d, "r.toml")
        out = os.path.join(d, "out")
        with open(recipe, "w") as f:
            f.write(RECIPE.format(assets=assets, model=model, out=out, rows=8 * (warmup + steps), steps=warmup + steps))
        subprocess.run([os.path.join(ROOT, "target", "release", "train"), "--recipe", recipe, "--resume", "never"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
        times = [r["step_s"] for r in rows if r["step"] > warmup]
        return statistics.median(times), min(times)


def trl(assets, model, warmup, steps):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.jsonl")
        subprocess.run([VENV_PY, os.path.join(TRL, "workloads.py"), "--family", "sft", "--models", model,
                        "--assets", assets, "--warmup", str(warmup), "--steps", str(steps), "--sft-packing", "",
                        "--out", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r = [json.loads(l) for l in open(out)][0]
        s = r["summary"]
        return s["step_s_median"], s["step_s_min"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="/tmp/bench-assets")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.assets, "manifest.json")):
        subprocess.run([VENV_PY, os.path.join(TRL, "assets.py"), "--out", a.assets], check=True)
    print("| model | round | whet median s/step | TRL median s/step | whet tok/s | TRL tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in a.models.split(","):
        for rnd in range(a.rounds):
            w, _ = whet(a.assets, model, a.warmup, a.steps)
            t, _ = trl(a.assets, model, a.warmup, a.steps)
            print(f"| {model} | {rnd + 1} | {w:.3f} | {t:.3f} | {2048 / w:.0f} | {2048 / t:.0f} | {t / w:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
