#!/usr/bin/env python3
"""LoRA against full fine-tuning on SmolLM2-135M-Instruct (issue 18): optimizer-state and checkpoint sizes, SFT
step time, and rollout sampling with the adapter merged into the decode weights vs applied unmerged.

    bash scripts/fetch-smollm2.sh target/release/train && cargo build --release -p trainer -p rollout
    python3 scripts/bench/lora.py [--steps 8] [--threads 1] [--rounds 3]

SFT: synthetic arithmetic, batch 8, max_length 64, `--steps` steps; full
fine-tuning and `lora = { r = 16, lora_alpha = 32, target_modules = "all-linear" }` run alternately `--rounds`
times (this machine is shared: medians of the per-step times of all rounds, steps after the first). Sizes: a
mid-stage checkpoint's optimizer state and weights (a 2-step run killed right after writing it) and a final
output. Sampling: rollout-bench on the adapter the first LoRA run saved, 16
prompts x 4 samples x 32 new tokens, fused (merged) and --no-fuse (unmerged), and the base without adapter both
ways.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

from common import TARGET

SMOL = os.path.expanduser(os.environ.get("SMOLLM2_DIR", "~/.cache/whet/smollm2-135m-instruct"))
RECIPE = """
[model]
path = "{model}"
{lora}

[run]
output_dir = "{out}"
seed = 0
threads = {threads}
log_every = 1
save_every = {half}

[[stage]]
kind = "sft"
name = "sft"
synthetic = {{ count = 400, arithmetic = {{ seed = 3, min_digits = 1, max_digits = 2, ops = ["add", "sub"] }} }}
tokenize = {{ max_length = 64 }}
max_steps = {steps}
batch_size = 8
lr = {lr}
"""
LORA = 'lora = { r = 16, lora_alpha = 32, target_modules = "all-linear" }'


def size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def sft(lora, a, keep, steps, kill=None):
    """One SFT run; `kill`: the fault point it is SIGKILLed at (to keep a mid-stage checkpoint on disk)."""
    out = os.path.join(keep, "lora" if lora else "full")
    subprocess.run(["rm", "-rf", out], check=True)
    r = os.path.join(keep, "r.toml")
    with open(r, "w") as f:
        f.write(RECIPE.format(model=SMOL, lora=LORA if lora else "", out=out, threads=a.threads, half=max(steps // 2, 1),
                              steps=steps, lr="2e-4" if lora else "2e-5"))
    env = dict(os.environ, **({"WHET_TEST_KILL": kill} if kill else {}))
    subprocess.run([os.path.join(TARGET, "release", "train"), "--recipe", r, "--resume", "never"], check=not kill,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return out


def step_times(out):
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [s["step_s"] for s in steps if "step_s" in s][1:]


def sizes_of(lora, a, keep):
    """Bytes of a mid-stage checkpoint's optimizer state and weights (the run is killed right after writing it)
    and of a finished run's final output."""
    out = sft(lora, a, keep, 2, kill="after-ckpt:0:1")
    mid = os.path.join(out, "checkpoints", "s00-step0000001")
    s = {"optimizer": size(os.path.join(mid, "optimizer.safetensors")), "weights": size(os.path.join(mid, "model"))}
    out = sft(lora, a, keep, 1)
    s["final"] = size(os.path.join(out, "checkpoints", "s00-final", "model"))
    return s, os.path.join(out, "checkpoints", "s00-final", "model")


def sample(adapter, fuse, a, prompts):
    cmd = [os.path.join(TARGET, "release", "rollout-bench"), "--model", SMOL, "--prompts", prompts, "--n", "4",
           "--new-tokens", "32", "--repeats", "3", "--warmup", "1", "--threads", str(a.threads)]
    if adapter:
        cmd += ["--adapter", adapter]
    if not fuse:
        cmd += ["--no-fuse"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    keep = tempfile.mkdtemp(prefix="whet-lora-bench-")
    times = {True: [], False: []}
    sizes = {}
    for _ in range(a.rounds):
        for lora in (False, True):
            times[lora] += step_times(sft(lora, a, keep, a.steps))
    adapter_keep = tempfile.mkdtemp(prefix="whet-lora-adapter-")
    for lora in (False, True):
        sizes[lora], final = sizes_of(lora, a, keep)
        if lora:
            adapter = os.path.join(adapter_keep, "adapter")
            subprocess.run(["cp", "-r", final, adapter], check=True)
    mb = lambda b: "%.1f MB" % (b / 1e6)
    print("| SmolLM2-135M SFT | optimizer state | weights in a checkpoint | final output | step time (median) |")
    print("|---|---:|---:|---:|---:|")
    for lora in (False, True):
        s = sizes[lora]
        name = "LoRA r 16, all-linear" if lora else "full fine-tuning"
        print(f"| {name} | {mb(s['optimizer'])} | {mb(s['weights'])} | {mb(s['final'])} | {statistics.median(times[lora]):.2f} s |")
    print(f"\nstep time ratio full / LoRA: {statistics.median(times[False]) / statistics.median(times[True]):.2f} "
          f"({len(times[True])} steps each, {a.threads} thread(s))")
    prompts = os.path.join(keep, "prompts.json")
    with open(prompts, "w") as f:
        json.dump([[1, 9690, 198] + [100 + 7 * i + j for j in range(12)] for i in range(16)], f)
    print("\n| sampling (16 prompts x 4, 32 new tokens) | tokens/s |\n|---|---:|")
    for adapter_on, fuse, name in [(False, True, "base, fused decode weights"), (True, True, "adapter merged into the decode weights"),
                                   (False, False, "base, unfused"), (True, False, "adapter unmerged (every projection)")]:
        r = sample(adapter if adapter_on else None, fuse, a, prompts)
        print(f"| {name} | {r['tok_s']:.0f} |")

if __name__ == "__main__":
    main()
