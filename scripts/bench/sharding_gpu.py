#!/usr/bin/env python3
"""Issue 20, item 6: peak GPU memory and step time of each `[run] sharding` mode at world size 1, next to the
dry run's plan — SFT on a random model of Phi-4-mini's shape (recipes/configs/phi4-mini-instruct-shape.json,
3.84 B parameters), bf16 weights with fp32 master weights, activation checkpointing, packed rows of
`--tokens` tokens, two micro-batches per step. At world size 1 every mode holds the same state (one rank owns
every block); what the table shows is each mode's machinery — the collectives become copies, ZeRO-2/3 release
and re-gather per layer — against the unsharded step, and the plan's accuracy on a real GPU.

Peak GPU memory is nvidia-smi's memory.used sampled every 50 ms, minus the idle reading (so it includes the
CUDA context and the caching allocator's slack); step time is the median of the logged steps after the first.

    python3 scripts/bench/sharding_gpu.py --train target/release/train --out $OUT            # on the GPU
    python3 scripts/bench/sharding_gpu.py --shape tiny --device cpu --out /tmp/sg             # a dry run here
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

from common import GpuMemPoll, random_model_recipe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 4096,
        "partial_rotary_factor": 0.75, "rope_theta": 10000.0, "rms_norm_eps": 1e-05}


def shape(name):
    if name == "tiny":
        return TINY
    with open(os.path.join(ROOT, "recipes", "configs", "phi4-mini-instruct-shape.json")) as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}


def recipe(cfg, device, sharding, tokens, steps, out):
    return random_model_recipe(cfg, device, "bfloat16", out, f'sharding = "{sharding}"\n') + f"""
[[stage]]
kind = "sft"
synthetic = {{ count = 4096, arithmetic = {{ seed = 1 }} }}
tokenize = {{ max_length = {tokens} }}
packing = true
max_steps = {steps}
batch_size = 1
grad_accum = 2
gradient_checkpointing = true
lr = 1e-5
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", default=os.path.join(ROOT, "target", "release", "train"))
    ap.add_argument("--out", default="sharding-gpu-out")
    ap.add_argument("--shape", choices=["phi4", "tiny"], default="phi4")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", default="none,optimizer,gradients,full")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    gpu = a.device.startswith("cuda")
    cfg = shape(a.shape)
    rows = []
    log = open(os.path.join(a.out, "sharding_gpu.log"), "w")
    with tempfile.TemporaryDirectory() as d:
        for mode in a.modes.split(","):
            out = os.path.join(d, f"out-{mode}")
            path = os.path.join(d, f"{mode}.toml")
            with open(path, "w") as f:
                f.write(recipe(cfg, a.device, mode, a.tokens, a.steps, out))
            plan = subprocess.run([a.train, "--recipe", path, "--dry-run"], capture_output=True, text=True).stdout
            row = [l for l in plan.splitlines() if l.startswith(f"| {mode} ←")]
            planned = float(row[0].split("|")[11]) if row else float("nan")
            poll = GpuMemPoll(gpu)
            idle = poll.read()
            t0 = time.time()
            with poll:
                r = subprocess.run([a.train, "--recipe", path, "--resume", "never"], capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            wall = time.time() - t0
            log.write(f"== {mode} (exit {r.returncode}, {wall:.1f} s)\n{r.stderr[-3000:]}\n")
            log.flush()
            steps = []
            metrics = os.path.join(out, "metrics.jsonl")
            if os.path.exists(metrics):
                steps = [json.loads(l)["step_s"] for l in open(metrics) if '"step_s"' in l]
            rss = re.findall(r"peak resident memory of this process: ([0-9.]+) GB", r.stderr)
            peak = (poll.peak - idle) * 1024 * 1024 / 1e9 if gpu else (float(rss[-1]) if rss else float("nan"))
            step = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
            rows.append((mode, planned, peak, step, r.returncode))
            print(f"{mode}: plan {planned:.1f} GB, peak {peak:.1f} GB, step {step:.3f} s, exit {r.returncode}", flush=True)
    what = "peak GPU memory (nvidia-smi − idle)" if gpu else "peak RSS"
    table = [f"SFT, {a.shape} shape, bf16 + fp32 masters, activation checkpointing, 2 × {a.tokens} tokens per step, world size 1, {a.device}",
             "", f"| sharding | plan (GB) | {what} (GB) | step median (s) | exit |", "|---|---:|---:|---:|---:|"]
    table += [f"| {m} | {p:.1f} | {k:.1f} | {s:.3f} | {rc} |" for m, p, k, s, rc in rows]
    with open(os.path.join(a.out, "sharding_gpu.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
