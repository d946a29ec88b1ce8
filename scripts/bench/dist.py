"""Data parallelism on this CPU: c10d Gloo all-reduce bandwidth over loopback, and the data-parallel step
overhead of `train --nproc-per-node 2` against one process.

    cargo build --release -p trainer --bin train && cargo build --release -p dist --example allreduce
    python3 scripts/bench/dist.py [--steps 12] [--rounds 2]

Step overhead, SFT on a random Qwen2-shaped model (4 layers, hidden 256, vocab 260, byte tokenizer), 8 rows
of ≤ 96 tokens per rank and step, one torch thread per rank, fp32; median step time over the steps after the
first two:
  - 1 process, batch 8 (the per-rank work of the 2-rank run);
  - 2 ranks, batch 8 each (global 16): weak scaling, ideally the same step time (overhead = ratio − 1);
  - 1 process, batch 8 × 2 accumulated (global 16, the same updates bit for bit).
The runs alternate, `--rounds` times."""
import argparse
import json
import os
import statistics
import subprocess

from common import TARGET, run_whet

RECIPE = """
[model]
config = {{ model_type = "qwen2", vocab_size = 260, hidden_size = 256, intermediate_size = 704, num_hidden_layers = 4, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, tie_word_embeddings = true }}
init_seed = 7
tokenizer = "builtin:bytes"
device = "cpu"

[run]
output_dir = "{{out}}"
seed = 3
threads = 1
log_every = 1

[[stage]]
kind = "sft"
synthetic = {{ count = 512, arithmetic = {{ seed = 5 }} }}
tokenize = {{ max_length = 96 }}
max_steps = {steps}
batch_size = 8
grad_accum = {accum}
lr = 1e-4
"""


def allreduce(ranks, sizes):
    exe = os.path.join(TARGET, "release", "examples", "allreduce")
    out = subprocess.run([exe, str(ranks), *map(str, sizes)], check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def step_s(recs):
    return statistics.median(r["step_s"] for r in recs[2:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    for ranks in (2, 3):
        for r in allreduce(ranks, [0.000004, 1, 25, 100]):
            print(json.dumps({"bench": "allreduce", **r}), flush=True)
    runs = {"1 process, batch 8": ([], 1, ()), "2 ranks, batch 8 each": ([], 1, ("--nproc-per-node", "2")),
            "1 process, batch 8 x 2 accumulated": ([], 2, ())}
    for _ in range(a.rounds):
        for name, (times, accum, args) in runs.items():
            recs = run_whet(RECIPE.format(steps=a.steps, accum=accum), "step_s", args)
            times.append(step_s(recs))
    base = statistics.median(runs["1 process, batch 8"][0])
    for name, (times, accum, args) in runs.items():
        t = statistics.median(times)
        rows = 8 * accum * (2 if args else 1)
        print(json.dumps({"bench": "dp_step", "run": name, "step_s": round(t, 4), "rows_per_s": round(rows / t, 1),
                          "vs_1_process_batch_8": round(t / base, 3), "rounds": [round(x, 4) for x in times]}), flush=True)


if __name__ == "__main__":
    main()
