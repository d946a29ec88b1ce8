#!/usr/bin/env python3
"""Generation speed: whet's rollout engine vs Hugging Face transformers' generate, same model files, prompts,
batch shapes and lengths (fixed length: EOS ignored, T=1.0 sampling, no top-k/top-p), in one run.

    python3 scripts/bench/generate.py [--models tiny,small] [--rounds 3] [--repeats 3] [--threads N]

* Models: the random-init Qwen2 "tiny" (4M) and "small" (26M) that ../shared/bench/trl/assets.py writes to
  /tmp/bench-assets (built here when missing, with the venv's python).
* Shapes: batch 16 x 128 new tokens (16 prompts, 1 sample each) and GRPO (4 prompts x 8 samples x 128 new).
  Prompts: the first problems of the assets' problems.jsonl through the ChatML template, tokenized once by the
  HF tokenizer; both sides get the same ids. transformers receives the GRPO batch as TRL builds it (each prompt
  repeated 8 times, left-padded); whet receives 4 requests with n = 8 (one prefill per prompt).
* Each measurement is a fresh process (peak RSS = its VmHWM), `--repeats` timed calls after one warm-up;
  the two sides alternate for `--rounds` rounds, and the table reports the median over all timed calls.
* Same torch thread count (--threads, default: every core this process may use, which is also torch's default)
  and dtype (--dtype float32|bfloat16) on both sides, OMP_WAIT_POLICY=PASSIVE as in ../shared/bench/trl. whet's
  native CPU decode step (fp32) runs on that many threads too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRL = os.path.abspath(os.path.join(ROOT, "..", "shared", "bench", "trl"))
VENV_PY = "/tmp/trl-venv/bin/python"

HF_WORKER = r"""
import json, os, sys, time, torch
from transformers import AutoModelForCausalLM
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
prompts = json.load(open(a["prompts"]))
rows = [p for p in prompts for _ in range(a["n"])]
L = max(len(p) for p in rows)
pad = a["pad_id"]
ids = torch.tensor([[pad] * (L - len(p)) + p for p in rows])
mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in rows])
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=getattr(torch, a["dtype"])).eval()
kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a["new"], min_new_tokens=a["new"],
          use_cache=True, pad_token_id=pad)
times = []
with torch.inference_mode():
    for i in range(a["warmup"] + a["repeats"]):
        torch.manual_seed(i)
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        dt = time.perf_counter() - t
        assert out.shape[1] - L == a["new"], out.shape
        if i >= a["warmup"]:
            times.append(dt)
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
tokens = len(rows) * a["new"]
med = sorted(times)[len(times) // 2]
print(json.dumps({"side": "hf", "times": times, "tokens": tokens, "median_s": med, "tok_s": tokens / med,
                  "peak_rss_kb": hwm, "threads": a["threads"]}))
"""


def sh(cmd, env=None, capture=True):
    r = subprocess.run(cmd, env=env, capture_output=capture, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:] if capture else ''}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default="/tmp/bench-assets")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--shapes", default="b16,grpo")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides")
    ap.add_argument("--python", default=VENV_PY, help="python with torch + transformers")
    ap.add_argument("--whet-bin", default=None, help="rollout-bench binary (default: cargo build --release)")
    ap.add_argument("--out", default="/tmp/whet-bench-generate.jsonl")
    a = ap.parse_args()

    if not os.path.exists(os.path.join(a.assets, "manifest.json")):
        print(f"building assets in {a.assets} ...", file=sys.stderr)
        sh([a.python, os.path.join(TRL, "assets.py"), "--out", a.assets], capture=False)
    whet = a.whet_bin
    if whet is None:
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        print("building rollout-bench (release) ...", file=sys.stderr)
        sh(["cargo", "build", "--release", "-p", "rollout", "--bin", "rollout-bench"], capture=False)
        whet = os.path.join(target, "release", "rollout-bench")

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME="/tmp/trl-bench/hf-home")
    # prompts: ChatML-templated problems, tokenized once by the HF tokenizer
    tok_script = r"""
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
probs = [json.loads(l) for l in open(sys.argv[2])][:16]
ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True) for p in probs]
ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ids]
print(json.dumps({"ids": ids, "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}))
"""
    tk = json.loads(sh([a.python, "-c", tok_script, os.path.join(a.assets, "tokenizer"),
                        os.path.join(a.assets, "data", "problems.jsonl")], env=env))
    shapes = {"b16": (16, 1), "grpo": (4, 8)}
    results = []
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "a") as log:
        for model in a.models.split(","):
            mdir = os.path.join(a.assets, "models", model)
            for shape in a.shapes.split(","):
                n_prompts, n = shapes[shape]
                pfile = f"/tmp/whet-bench-prompts-{shape}.json"
                json.dump(tk["ids"][:n_prompts], open(pfile, "w"))
                runs = {"hf": [], "whet": []}
                for r in range(a.rounds):
                    for side in (["hf", "whet"] if r % 2 == 0 else ["whet", "hf"]):
                        if side == "hf":
                            arg = json.dumps({"model": mdir, "prompts": pfile, "n": n, "new": a.new_tokens, "pad_id": tk["pad"],
                                              "threads": a.threads, "warmup": a.warmup, "repeats": a.repeats,
                                              "dtype": a.dtype})
                            res = json.loads(sh([a.python, "-c", HF_WORKER, arg], env=env).strip().splitlines()[-1])
                        else:
                            res = json.loads(sh([whet, "--model", mdir, "--prompts", pfile, "--n", str(n), "--new-tokens",
                                                 str(a.new_tokens), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
                                                 "--threads", str(a.threads), "--dtype", a.dtype], env=env).strip().splitlines()[-1])
                        res.update(model=model, shape=shape, round=r, time=time.time())
                        log.write(json.dumps(res) + "\n")
                        runs[side].append(res)
                        print(f"  {model} {shape} round {r} {side}: {res['tok_s']:.0f} tok/s", file=sys.stderr)
                row = {"model": model, "shape": shape}
                for side in runs:
                    times = [t for x in runs[side] for t in x["times"]]
                    tokens = runs[side][0]["tokens"]
                    row[side] = tokens / statistics.median(times)
                    row[side + "_rss_mb"] = max(x["peak_rss_kb"] for x in runs[side]) / 1024
                results.append(row)
    desc = {"b16": "16 x 128", "grpo": "4 prompts x 8 samples x 128"}
    load = os.getloadavg()[0]
    print(f"\n{a.dtype}, threads {a.threads}, {a.rounds} rounds x {a.repeats} timed calls per side, load average {load:.1f}\n")
    print("| model | shape | transformers tok/s | whet tok/s | ratio | transformers peak RSS | whet peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {desc[r['shape']]} | {r['hf']:.0f} | {r['whet']:.0f} | {r['whet'] / r['hf']:.2f}x "
              f"| {r['hf_rss_mb']:.0f} MB | {r['whet_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
