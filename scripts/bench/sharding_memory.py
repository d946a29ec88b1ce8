#!/usr/bin/env python3
"""Per-rank peak memory of sharded data parallelism against the dry run's plan (issue 20): SFT on a random
81 M-parameter Llama on the CPU (fp32; two micro-batches of 2 × 128 tokens per rank and step, so gradients
accumulate), on 2 and 4 Gloo ranks, with `[run] sharding` "none", "optimizer" and "gradients" (and on 4 ranks
with activation checkpointing, under which ZeRO-2 reduces layer by layer and "full" (ZeRO-3) runs). Prints the plan's
per-rank total (`--dry-run --nproc-per-node N`) next to the largest peak resident memory of the ranks (each rank
prints its VmHWM when it ends; it includes libtorch's own few hundred MB and Gloo's buffers, which the last rows
measure on a 0.1 M-parameter model).

    cargo build --release -p trainer && python3 scripts/bench/sharding_memory.py
"""
import os
import re
import subprocess
import tempfile

from common import TARGET, random_llama_recipe

STAGE = """kind = "sft"
synthetic = {{ count = 64, arithmetic = {{ seed = 1 }} }}
tokenize = {{ max_length = 128 }}
max_steps = 2
batch_size = 2
grad_accum = 2
gradient_checkpointing = {ck}
lr = 1e-4
"""


def main():
    train = os.path.join(TARGET, "release", "train")
    print("| ranks | sharding | plan per rank (GB) | measured peak RSS, largest rank (GB) | measured − plan (GB) |")
    print("|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        big = dict()
        tiny = dict(vocab=260, hidden=24, inter=48)
        runs = [(w, s, big, "false", s) for w in [2, 4] for s in ["none", "optimizer", "gradients"]]
        runs += [(4, s, big, "true", f"{s}, activation checkpointing") for s in ["none", "gradients", "full"]]
        runs += [(w, "none", tiny, "false", "baseline: 0.1 M parameters") for w in [2, 4]]
        for world, sharding, shape, ck, label in runs:
            r = os.path.join(d, "r.toml")
            with open(r, "w") as f:
                recipe = random_llama_recipe(f'sharding = "{sharding}"\n', STAGE, **shape)
                f.write(recipe.format(out=os.path.join(d, f"out-{world}-{label}"), ck=ck))
            launch = ["--nproc-per-node", str(world)]
            plan = subprocess.run([train, "--recipe", r, "--dry-run", *launch], capture_output=True, text=True, check=True).stdout
            row = [l for l in plan.splitlines() if l.startswith(f"| {sharding} ←")][0]
            total = float(row.split("|")[11].strip())
            run = subprocess.run([train, "--recipe", r, "--resume", "never", *launch], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            peaks = [float(x) for x in re.findall(r"peak resident memory of this process: ([0-9.]+) GB", run.stderr)]
            assert len(peaks) == world, run.stderr
            print(f"| {world} | {label} | {total:.2f} | {max(peaks):.2f} | {max(peaks) - total:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
