#!/usr/bin/env python3
"""The dry run's memory plan against measured peak memory (issue 20): SFT on a random 81 M-parameter Llama on the
CPU, fp32, one process, for micro-batches of 4 × 256 and 8 × 512 tokens, with and without activation
checkpointing. Prints the plan's peak (`--dry-run`, sharding "none") next to the process's peak resident memory
(VmHWM through /usr/bin/time -v; it includes libtorch's own few hundred MB).

    cargo build --release -p trainer && python3 scripts/bench/memory_plan.py
"""
import os
import re
import subprocess
import tempfile

from common import TARGET, random_llama_recipe

RECIPE = random_llama_recipe("", """kind = "sft"
synthetic = {{ count = 64, arithmetic = {{ seed = 1 }} }}
tokenize = {{ max_length = {length} }}
packing = true
max_steps = 2
batch_size = {rows}
gradient_checkpointing = {ck}
lr = 1e-4
""")


def main():
    train = os.path.join(TARGET, "release", "train")
    print("| micro-batch | activation checkpointing | plan (GB) | measured peak RSS (GB) |\n|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for rows, length, ck in [(4, 256, "false"), (8, 512, "false"), (8, 512, "true")]:
            r = os.path.join(d, "r.toml")
            with open(r, "w") as f:
                f.write(RECIPE.format(out=os.path.join(d, f"out-{rows}-{ck}"), length=length, rows=rows, ck=ck))
            plan = subprocess.run([train, "--recipe", r, "--dry-run"], capture_output=True, text=True, check=True).stdout
            total = [l for l in plan.splitlines() if l.startswith("| none |")][0].split("|")[-2].strip()
            run = subprocess.run(["/usr/bin/time", "-v", train, "--recipe", r, "--resume", "never"], capture_output=True, text=True, check=True)
            kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
            print(f"| {rows} × {length} tokens | {ck} | {total} | {kb * 1024 / 1e9:.2f} |")


if __name__ == "__main__":
    main()
