#!/usr/bin/env python3
"""DPO step time, whet against TRL's DPOTrainer, side by side in one run on the same model files and pairs.

Uses ../shared/bench/trl (its assets: random-init Qwen2 "tiny" 4M and "small" 26M, ChatML tokenizer, conversational
preference pairs of 217-270 tokens cut to 256) and its venv (/tmp/trl-venv) for the TRL side. Shape: 8 pairs per
step (16 sequences of <= 256 tokens), fp32, AdamW lr 1e-6, beta 0.1, sigmoid loss, 2 torch threads on both sides.
Three measurements per model and round:

  whet         reference log-probabilities precomputed once before training (whet always does this; cached)
  TRL precomp  DPOTrainer with precompute_ref_log_probs=True (reference pass before training, not timed)
  TRL default  DPOTrainer as shipped: a reference model forward inside every step

Step time = wall time from one optimizer step to the next, warm-up steps dropped, median over the rest.

    python3 scripts/bench/dpo.py [--rounds 1] [--steps 6] [--models tiny,small]

Needs target/release/train (cargo build --release -p trainer).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import TRL, VENV_PY, ensure_assets, run_whet
# Both sides run libtorch with libgomp. Its default spin-then-sleep barrier collapses when the 2 cores are shared
# with other busy processes (measured: whet's tiny step 0.46 s idle-ish vs 3.6 s at load ~5); the TRL harness
# sets PASSIVE for the same reason, so both sides get it here (override by exporting OMP_WAIT_POLICY).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
kind = "dpo"
data = {{ path = "{assets}/data/preference.jsonl", prompt = "prompt", chosen = "chosen", rejected = "rejected", limit = {rows} }}
tokenize = {{ max_length = 256, truncation = "right" }}
max_steps = {steps}
batch_size = 8
lr = 1e-6
beta = 0.1
loss_type = "sigmoid"
schedule = "constant"
max_grad_norm = 1.0
"""

# The TRL side: workloads.py's helpers (same model loading, thread setup and step timer as its DPO workload),
# with precompute_ref_log_probs as a switch.
TRL_SIDE = r"""
import copy, json, os, sys
sys.path.insert(0, sys.argv[1])
import workloads as w
assets, model_name, warmup, steps, precompute, out = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1", sys.argv[7]
import warnings; warnings.filterwarnings("ignore")
from transformers.utils import logging as hf_logging; hf_logging.set_verbosity_error()
w.setup_torch()
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
tok = w.load_tokenizer(os.path.join(assets, "tokenizer"))
model = w.load_model(os.path.join(assets, "models", model_name))
ref = copy.deepcopy(model).eval()
rows = w.load_jsonl(os.path.join(assets, "data", "preference.jsonl"), limit=8 * (warmup + steps))
kw = w.common_args(f"dpo-bench-{model_name}-{int(precompute)}", steps, warmup)
args = DPOConfig(**kw, per_device_train_batch_size=8, learning_rate=1e-6, optim="adamw_torch_fused", max_length=256,
                 beta=0.1, precompute_ref_log_probs=precompute)
timer = w.make_timer_callback()
trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                     callbacks=[timer])
w.instrument(trainer, timer)
trainer.train()
s = w.summarize(timer.times, timer.tokens, warmup, timer.cpu)
json.dump({"median": s["step_s_median"], "min": s["step_s_min"]}, open(out, "w"))
"""


def whet(assets, model, warmup, steps):
    rows = run_whet(RECIPE.format(assets=assets, model=model, rows=8 * (warmup + steps), steps=warmup + steps), "step_s")
    times = [r["step_s"] for r in rows if r["step"] > warmup]
    return statistics.median(times), min(times)


def trl(assets, model, warmup, steps, precompute):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        env = dict(os.environ, TRL_BENCH_THREADS="2")
        subprocess.run([VENV_PY, "-c", TRL_SIDE, TRL, assets, model, str(warmup), str(steps), "1" if precompute else "0", out],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        r = json.load(open(out))
        return r["median"], r["min"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", default="/tmp/bench-assets")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    ensure_assets(a.assets)
    print("| model | round | whet s/step | TRL precomputed ref s/step | TRL default s/step | vs TRL precomputed | vs TRL default |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in a.models.split(","):
        for rnd in range(a.rounds):
            w, _ = whet(a.assets, model, a.warmup, a.steps)
            tp, _ = trl(a.assets, model, a.warmup, a.steps, True)
            td, _ = trl(a.assets, model, a.warmup, a.steps, False)
            print(f"| {model} | {rnd + 1} | {w:.3f} | {tp:.3f} | {td:.3f} | {tp / w:.2f}x | {td / w:.2f}x |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
