#!/usr/bin/env python3
"""Generation speed on a GPU against the memory-bandwidth floor, whet's rollout engine side by side with
transformers' `generate`, on one random-init Qwen2.5-0.5B-shaped model in bf16 (issue 5, part 5).

    python3 scripts/bench/generate_gpu.py --whet-bin target/release/rollout-bench [--batches 64,128,256] \
        [--prompt-len 128] [--new-tokens 512] [--repeats 2] [--warmup 1] [--out DIR]

Runs where PyTorch with CUDA and transformers are installed (the GPU machine: no Rust there, so `rollout-bench`
is built on a CPU machine and carried; it loads CUDA through this python's torch/lib, see
../shared/notes/libtorch-and-tch.md, "preload rule").

* Model: Qwen2Config with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864,
  vocab 151936, tied embeddings), random init (seed 0), saved in bf16 to --model-dir; both sides load these files.
* Work: `batch` distinct prompts of `--prompt-len` random token ids (seed 1), one sample each, exactly
  `--new-tokens` new tokens (EOS ignored), T = 1.0 sampling without top-k/top-p. transformers gets the batch as
  one tensor (equal lengths: no padding); whet gets `batch` requests with n = 1.
* Each side runs in one process (the model loads once) over the batch sizes in turn: per size 1 warm-up call,
  then --repeats timed calls, CUDA synchronised around each; the table gives the median. Peak GPU memory:
  nvidia-smi's memory.used sampled every 50 ms during the process, minus the idle reading (CUDA context
  included), i.e. the peak over all batch sizes, which the largest sets.
* Floor: a decode step must read every weight once (bf16) and every row's KV cache up to its length. With B rows,
  prompt P, N new tokens, W weight bytes and K KV bytes per token (2 × layers × KV heads × head dim × 2 bytes),
  the bytes of the whole call are N·W + K·B·Σ_{t<N}(P + t); over the measured device-to-device copy bandwidth
  (bytes read + written per second, torch's own copy kernel) that gives the fastest the call can be, and
  floor tok/s = B·N / that time. The prefill (B·P tokens in one pass) is counted as one more weight read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import GpuMemPoll

HF_WORKER = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
a = json.loads(sys.argv[1])
prompts = json.load(open(a["prompts"]))
dev = a["device"]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.bfloat16).to(dev).eval()
kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a["new"], min_new_tokens=a["new"],
          use_cache=True, pad_token_id=0)
for b in a["batches"]:
    ids = torch.tensor(prompts[:b], device=dev)
    mask = torch.ones_like(ids)
    times = []
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for i in range(a["warmup"] + a["repeats"]):
            torch.manual_seed(i)
            sync()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            sync()
            dt = time.perf_counter() - t
            assert out.shape[1] - ids.shape[1] == a["new"], out.shape
            if i >= a["warmup"]:
                times.append(dt)
    tokens = ids.shape[0] * a["new"]
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"side": "hf", "batch": b, "times": times, "tokens": tokens, "median_s": med, "tok_s": tokens / med,
                      "torch_peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None}), flush=True)
"""

# the shapes of issue 21: Qwen2.5-0.5B, Qwen2.5-1.5B (their config.json values) and Phi-4-mini
# (recipes/configs/phi4-mini-instruct-shape.json)
SHAPES = {
    "qwen0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "qwen1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
    "phi4mini": dict(arch="phi3"),
    # for a dry run on a CPU
    "tiny": dict(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}

MAKE_MODEL = r"""
import json, sys, torch
spec = json.loads(sys.argv[2])
arch = spec.pop("arch")
if arch == "qwen2":
    from transformers import Qwen2Config as C, Qwen2ForCausalLM as M
    cfg = C(**spec)
else:
    from transformers import Phi3Config as C, Phi3ForCausalLM as M
    shape = json.load(open(sys.argv[3]))
    cfg = C(**{k: v for k, v in shape.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype", "model_type")})
torch.manual_seed(0)
with torch.device(sys.argv[4]):
    m = M(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in m.parameters()))
"""

BANDWIDTH = r"""
import json, torch
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
ts = []
for _ in range(10):
    s.record(); y.copy_(x); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
ts.sort()
p = torch.cuda.get_device_properties(0)
print(json.dumps({"bytes_per_s": 2 * x.numel() / ts[len(ts) // 2], "name": p.name, "sms": p.multi_processor_count,
                  "total_memory": p.total_memory}))
"""


WHET_FLAGS = {"whet": [], "whet_nofuse": ["--no-fuse"], "whet_static": ["--static", "--no-graphs"], "whet_graphs": ["--static"]}


def run_lines(cmd, env, log):
    """Runs `cmd`; returns its stdout's JSON lines (or one {"error": ...})."""
    t = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)[:300]}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}\nexit {r.returncode} ({time.time() - t:.1f} s)\n")
    log.flush()
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 and not lines:
        return [{"error": (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]}]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--whet-bin", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    ap.add_argument("--model-dir", default=None, help="default /tmp/<shape>-shape")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sides", default="whet_graphs,whet,hf",
                    help="whet_graphs (static decoding replayed as CUDA graphs), whet_static (static, eager), whet "
                         "(dynamic), whet_nofuse (dynamic on the parameters), hf")
    ap.add_argument("--device", default="cuda", help="cuda; cpu for a dry run (no floor, no GPU memory)")
    ap.add_argument("--check-graphs", action="store_true", help="first compare graph replay with eager static decoding")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/whet-gpu-bench"))
    a = ap.parse_args()
    a.model_dir = a.model_dir or f"/tmp/{a.shape}-shape"
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "generate_gpu.log"), "a")
    py = sys.executable
    import torch  # noqa: the GPU machine's torch; only for its lib path and the RNG of the prompts

    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(os.path.dirname(torch.__file__), "lib"),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not os.path.exists(os.path.join(a.model_dir, "config.json")):
        phi = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "configs", "phi4-mini-instruct-shape.json")
        n_params = int(subprocess.run([py, "-c", MAKE_MODEL, a.model_dir, json.dumps(SHAPES[a.shape]), phi, a.device], env=env,
                                      capture_output=True, text=True, check=True).stdout.split()[-1])
    else:
        n_params = None
    cfg = json.load(open(os.path.join(a.model_dir, "config.json")))
    gpu = a.device == "cuda"
    bw = run_lines([py, "-c", BANDWIDTH], env, log)[0] if gpu else {"name": "cpu"}
    print(f"device: {bw.get('name')}, copy bandwidth {bw.get('bytes_per_s', 0) / 1e12:.2f} TB/s", flush=True)
    g = torch.Generator().manual_seed(1)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
    if n_params is None:
        import safetensors.torch as st
        n_params = sum(t.numel() for t in st.load_file(os.path.join(a.model_dir, "model.safetensors")).values())
    weight_bytes = 2 * n_params
    batches = [int(x) for x in a.batches.split(",")]
    n, p = a.new_tokens, a.prompt_len
    prompts = torch.randint(0, cfg["vocab_size"], (max(batches), p), generator=g).tolist()
    pfile = "/tmp/whet-gpu-prompts.json"
    json.dump(prompts, open(pfile, "w"))
    rows = {b: {"batch": b, "prompt": p, "new": n} for b in batches}
    for b, row in rows.items():
        floor_bytes = (n + 1) * weight_bytes + kv_bytes_per_token * b * sum(p + t for t in range(n))
        floor_s = floor_bytes / bw["bytes_per_s"] if "bytes_per_s" in bw else float("nan")
        row.update(floor_tok_s=b * n / floor_s, floor_s=floor_s, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token)
    idle = GpuMemPoll(gpu).read()
    if a.check_graphs:
        # graph replay against the same static steps run eagerly (issue 21: "graph replay is tested against eager
        # decoding on the GPU"), on the first batch size with greedy, T = 1 and top-p rows
        chk = run_lines([a.whet_bin, "--model", a.model_dir, "--prompts", pfile, "--new-tokens", str(n), "--device", a.device,
                         "--dtype", "bfloat16", "--batches", str(batches[0]), "--check-graphs"], env, log)
        print(f"graph replay vs eager static decoding: {json.dumps(chk[0])}", flush=True)
        with open(os.path.join(a.out, "graph_check.jsonl"), "a") as f:
            f.write(json.dumps(dict(chk[0], shape=a.shape, batch=batches[0])) + "\n")
    for side in [x for x in a.sides.split(",") if x]:
        # one process per side: the model loads once; peak GPU memory is over all its batch sizes
        with GpuMemPoll(gpu) as mem:
            if side.startswith("whet"):
                res = run_lines([a.whet_bin, "--model", a.model_dir, "--prompts", pfile, "--n", "1", "--new-tokens", str(n),
                                 "--repeats", str(a.repeats), "--warmup", str(a.warmup), "--device", a.device, "--dtype",
                                 "bfloat16", "--batches", a.batches] + WHET_FLAGS[side], env, log)
            else:
                res = run_lines([py, "-c", HF_WORKER, json.dumps({"model": a.model_dir, "prompts": pfile, "new": n,
                                 "warmup": a.warmup, "repeats": a.repeats, "batches": batches, "device": a.device})], env, log)
        for r in res:
            if "error" in r:
                print(f"{side}: {r['error']}", flush=True)
                continue
            r["gpu_peak_mib"] = mem.peak - idle
            rows[r["batch"]][side] = r
            print(f"batch {r['batch']} {side}: {r['tok_s']:.0f} tok/s, median {r['median_s']:.2f} s", flush=True)
        print(f"{side}: peak GPU memory {mem.peak - idle} MiB", flush=True)
    rows = [rows[b] for b in batches]
    with open(os.path.join(a.out, "generate_gpu.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(dict(row, device=bw.get("name"), bandwidth=bw.get("bytes_per_s"))) + "\n")
    sides = [x for x in a.sides.split(",") if x.startswith("whet")]
    best = lambda r: max((r[x]["tok_s"] for x in sides if r.get(x, {}).get("tok_s")), default=None)
    print(f"\n{bw.get('name')}, bf16, {a.shape} shape ({n_params / 1e6:.0f}M parameters, random init), prompt "
          f"{a.prompt_len} + {a.new_tokens} new tokens, copy bandwidth {bw.get('bytes_per_s', 0) / 1e12:.2f} TB/s\n")
    print("| batch | floor tok/s | " + " | ".join(f"{x} tok/s" for x in sides) +
          " | best % of floor | transformers tok/s | best whet / transformers | " + " | ".join(f"{x} GPU peak" for x in sides) +
          " | transformers GPU peak |")
    print("|---:|---:|" + "---:|" * (2 * len(sides) + 4))
    f = lambda v: f"{v:.0f}" if v else "–"
    for r in rows:
        h, wt = r.get("hf", {}), best(r)
        ht = h.get("tok_s")
        print(f"| {r['batch']} | {r['floor_tok_s']:.0f} | " + " | ".join(f(r.get(x, {}).get("tok_s")) for x in sides) +
              f" | {f(wt and 100 * wt / r['floor_tok_s'])} % | {f(ht)} | {(wt / ht) if wt and ht else float('nan'):.2f}× | " +
              " | ".join(f"{r.get(x, {}).get('gpu_peak_mib', '–')} MiB" for x in sides) + f" | {h.get('gpu_peak_mib', '–')} MiB |")


if __name__ == "__main__":
    main()
