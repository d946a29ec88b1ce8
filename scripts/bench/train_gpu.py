#!/usr/bin/env python3
"""Issue 21, item 2: training efficiency on one GPU — SFT steps and the GRPO update at Qwen2.5-0.5B, Qwen2.5-1.5B
and Phi-4-mini shapes (random init), bf16 compute with fp32 master weights, SDPA attention, chunked log-probs:
tokens/s, peak GPU memory and MFU; plus a GRPO step split (generate / score / train) at one shape.

    python3 scripts/bench/train_gpu.py --train target/release/train --out $OUT                   # on the GPU
    python3 scripts/bench/train_gpu.py --device cpu --shapes tiny --tokens 256 --out /tmp/tg      # a dry run here

* Models: `[model] config = {...}` with the shapes of scripts/bench/generate_gpu.py (SHAPES), random init,
  `tokenizer = "builtin:bytes"` (ids below 256; the full vocabulary still costs its output head).
* SFT: the seeded arithmetic generator's problems packed into rows of `--tokens` tokens (one row per
  micro-batch, one micro-batch per step), `--steps` steps; activation checkpointing where the shape asks for it
  (Phi-4-mini). Step time: the median of metrics.jsonl's `step_s` after the first step; tokens/s = row tokens
  over that.
* GRPO: `--grpo-prompts` prompts × 8 completions of exactly `--grpo-new` tokens (EOS ignored), one update per
  step (μ = 1, no reference model); the update's tokens/s = `forward_tokens` / `time_train_s`.
* MFU (PaLM, Chowdhery et al. 2022, appendix B): model FLOPs per trained token = 6·N + 12·L·d·T with N the
  parameters that take part in matmuls (every parameter but the embedding lookup; a tied output head counts
  once), L layers, d the attention width (heads × head_dim) and T the row length (packed rows: the whole row,
  an upper bound, since documents do not attend across each other); activation recomputation is not counted.
  Divided by the card's dense bf16 peak (H100 / H200 SXM: 989 TFLOP/s; A100: 312).
* Peak GPU memory: nvidia-smi's memory.used sampled every 50 ms, minus the idle reading (CUDA context included).
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from common import GpuMemPoll, ROOT, random_model_recipe
from generate_gpu import SHAPES

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TINY = dict(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)


def hf_config(shape):
    spec = dict(TINY if shape == "tiny" else SHAPES[shape])
    arch = spec.pop("arch")
    if arch == "phi3":
        with open(os.path.join(ROOT, "recipes", "configs", "phi4-mini-instruct-shape.json")) as f:
            spec = {k: v for k, v in json.load(f).items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "model_type")}
    spec.pop("bos_token_id", None)
    spec.pop("eos_token_id", None)
    return dict(model_type=arch, **spec)


def flops_per_token(cfg, t):
    """PaLM's 6N + 12·L·d·T (see the module documentation)."""
    h, inter, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    n = layers * per_layer + v * h  # the output head (tied or not) is one matmul of v × h
    return 6 * n + 12 * layers * heads * hd * t, n


def sft_recipe(cfg, device, dtype, tokens, steps, checkpointing, out):
    return random_model_recipe(cfg, device, dtype, out) + f"""
[[stage]]
kind = "sft"
synthetic = {{ count = 20000, arithmetic = {{ seed = 1 }} }}
tokenize = {{ max_length = {tokens} }}
packing = true
max_steps = {steps}
batch_size = 1
grad_accum = 1
gradient_checkpointing = {str(checkpointing).lower()}
lr = 1e-5
"""


def grpo_recipe(cfg, device, dtype, prompts, new, steps, checkpointing, out):
    return random_model_recipe(cfg, device, dtype, out) + f"""
[generation]
decode = "auto"

[[stage]]
kind = "grpo"
synthetic = {{ count = 2000, arithmetic = {{ seed = 1 }} }}
max_steps = {steps}
prompts_per_step = {prompts}
num_generations = 8
max_completion_length = {new}
ignore_eos = true
temperature = 1.0
lr = 1e-6
micro_batch_size = {prompts * 8 // 4}
gradient_checkpointing = {str(checkpointing).lower()}
kl_coef = 0.0
reward = [{{ kind = "accuracy" }}]
"""


def run(train, recipe_text, gpu, log, name):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        path = os.path.join(d, "r.toml")
        with open(path, "w") as f:
            f.write(recipe_text.replace("{out}", out))
        poll = GpuMemPoll(gpu)
        idle = poll.read()
        t = time.time()
        with poll:
            r = subprocess.run([train, "--recipe", path, "--resume", "never"], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        log.write(f"== {name} (exit {r.returncode}, {time.time() - t:.1f} s)\n{r.stderr[-3000:]}\n")
        log.flush()
        metrics = os.path.join(out, "metrics.jsonl")
        recs = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
        steps = [m for m in recs if "step_s" in m]
        err = None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return steps, (poll.peak - idle) / 1024 if gpu else float("nan"), err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=os.path.join(ROOT, "target", "release", "train"))
    ap.add_argument("--out", default=os.environ.get("OUT", "train-gpu-out"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="qwen0.5b,qwen1.5b,phi4mini")
    ap.add_argument("--tokens", default="4096,16384", help="SFT row lengths (Phi-4-mini: the first two at most 8192)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grpo-shape", default="qwen1.5b", help="the shape of the GRPO step split ('' to skip)")
    ap.add_argument("--grpo-prompts", type=int, default=16)
    ap.add_argument("--grpo-new", type=int, default=512)
    ap.add_argument("--grpo-steps", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    gpu = a.device.startswith("cuda")
    name = "cpu"
    if gpu:
        import torch
        name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    dtype = "bfloat16" if gpu else "float32"
    log = open(os.path.join(a.out, "train_gpu.log"), "a")
    rows = []
    for shape in a.shapes.split(","):
        cfg = hf_config(shape)
        checkpointing = shape == "phi4mini"
        for tokens in [int(x) for x in a.tokens.split(",")]:
            if shape == "phi4mini":
                tokens = min(tokens, 8192)
            steps, mem, err = run(a.train, sft_recipe(cfg, a.device, dtype, tokens, a.steps, checkpointing, "{out}"), gpu, log, f"sft {shape} {tokens}")
            step_s = statistics.median([m["step_s"] for m in steps[1:]]) if len(steps) > 1 else float("nan")
            row_tokens = statistics.median([m["tokens_per_s"] * m["step_s"] for m in steps[1:]]) if len(steps) > 1 else float("nan")
            fpt, n = flops_per_token(cfg, tokens)
            tok_s = row_tokens / step_s
            mfu = fpt * tok_s / peak if peak else float("nan")
            rows.append(dict(kind="sft", shape=shape, tokens=tokens, checkpointing=checkpointing, step_s=step_s, tok_s=tok_s,
                             mfu=mfu, peak_gib=mem, params=n, error=err, device=name))
            print(f"sft {shape} rows of {tokens}: {tok_s:.0f} tok/s, MFU {100 * mfu:.1f} %, peak {mem:.1f} GiB{', ' + err if err else ''}", flush=True)
    if a.grpo_shape:
        cfg = hf_config(a.grpo_shape)
        steps, mem, err = run(a.train, grpo_recipe(cfg, a.device, dtype, a.grpo_prompts, a.grpo_new, a.grpo_steps, False, "{out}"), gpu, log,
                              f"grpo {a.grpo_shape}")
        later = steps[1:] or steps
        med = lambda k: statistics.median([m[k] for m in later]) if later else float("nan")
        ft = med("forward_tokens")
        train_s = med("time_train_s")
        fpt, _ = flops_per_token(cfg, a.grpo_new + 40)
        mfu = fpt * ft / train_s / peak if peak else float("nan")
        split = dict(generate_s=med("time_generate_s"), score_s=med("time_score_s"), train_s=train_s, step_s=med("step_s"))
        rows.append(dict(kind="grpo", shape=a.grpo_shape, sequences=8 * a.grpo_prompts, new_tokens=a.grpo_new, forward_tokens=ft,
                         update_tok_s=ft / train_s, update_mfu=mfu, peak_gib=mem, error=err, device=name, **split))
        print(f"grpo {a.grpo_shape}: step {split['step_s']:.2f} s = generate {split['generate_s']:.2f} + score {split['score_s']:.2f} + "
              f"train {train_s:.2f}; update {ft / train_s:.0f} tok/s, MFU {100 * mfu:.1f} %{', ' + err if err else ''}", flush=True)
    with open(os.path.join(a.out, "train_gpu.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    table = [f"{name}, {dtype}{' + fp32 master weights' if gpu else ''}, random init, {a.steps} steps (median after the first)", "",
             "| shape | rows of | checkpointing | step (s) | tokens/s | MFU | peak GPU memory (GiB) |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == "sft":
            table.append(f"| {r['shape']} | {r['tokens']} | {'yes' if r['checkpointing'] else 'no'} | {r['step_s']:.3f} | {r['tok_s']:.0f} | "
                         f"{100 * r['mfu']:.1f} % | {r['peak_gib']:.1f} |")
    for r in rows:
        if r["kind"] == "grpo":
            table += ["", f"GRPO step at the {r['shape']} shape: {r['sequences']} sequences × {r['new_tokens']} new tokens",
                      "", "| generate (s) | score (s) | train (s) | step (s) | update tokens/s | update MFU |", "|---:|---:|---:|---:|---:|---:|",
                      f"| {r['generate_s']:.2f} | {r['score_s']:.2f} | {r['train_s']:.2f} | {r['step_s']:.2f} | {r['update_tok_s']:.0f} | "
                      f"{100 * r['update_mfu']:.1f} % |"]
    with open(os.path.join(a.out, "train_gpu.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
