#!/usr/bin/env python3
"""Two builds of whet side by side on the GRPO or DPO benchmark of scripts/bench (same shapes, same TRL side):
per configuration the runs go before, after, TRL, after, before, and each build's time is the mean of its two
runs, so a drift of the machine's load hits both alike. Prints the Markdown table with the ratios against TRL.

    python3 scripts/bench/compare_builds.py grpo|dpo BEFORE_TARGET_DIR AFTER_TARGET_DIR

A target dir is what CARGO_TARGET_DIR names: it holds release/train (e.g. a worktree of the old commit built with
`CARGO_TARGET_DIR=/tmp/old cargo build --release -p trainer`). Needs the TRL venv (see common.py).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import grpo  # noqa: E402

def with_target(t, f, *a):
    common.TARGET = t
    return f(*a)

which, B, A = sys.argv[1], sys.argv[2], sys.argv[3]
assets = "/tmp/bench-assets"
common.ensure_assets(assets)
if which == "grpo":
    print("| model | kl | whet before s/step (gen / score / train) | whet after s/step (gen / score / train) | TRL s/step | ratio before | ratio after |")
    print("|---|---:|---|---|---:|---:|---:|")
    for model in ["tiny", "small"]:
        for beta in [0.04, 0.0]:
            b1 = with_target(B, grpo.whet, assets, model, beta, 1, 5)
            a1 = with_target(A, grpo.whet, assets, model, beta, 1, 5)
            t = grpo.trl(assets, model, beta, 1, 5)
            a2 = with_target(A, grpo.whet, assets, model, beta, 1, 5)
            b2 = with_target(B, grpo.whet, assets, model, beta, 1, 5)
            mb = [statistics.mean([x, y]) for x, y in zip(b1, b2)]
            ma = [statistics.mean([x, y]) for x, y in zip(a1, a2)]
            f = lambda x: f"{x[0]:.2f} ({x[1]:.2f} / {x[2]:.2f} / {x[3]:.2f})"
            print(f"| {model} | {beta} | {f(mb)} | {f(ma)} | {t[0]:.2f} | {t[0] / mb[0]:.2f}x | {t[0] / ma[0]:.2f}x |", flush=True)
            print(f"  raw before {b1[0]:.3f} {b2[0]:.3f} after {a1[0]:.3f} {a2[0]:.3f}", file=sys.stderr, flush=True)
else:
    import dpo  # sets OMP_WAIT_POLICY=PASSIVE for both sides, as scripts/bench/dpo.py does
    print("| model | whet before s/step | whet after s/step | TRL precomputed | TRL default | before vs precomputed / default | after vs precomputed / default |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model in ["tiny", "small"]:
        b1 = with_target(B, dpo.whet, assets, model, 2, 6)[0]
        a1 = with_target(A, dpo.whet, assets, model, 2, 6)[0]
        tp = dpo.trl(assets, model, 2, 6, True)[0]
        td = dpo.trl(assets, model, 2, 6, False)[0]
        a2 = with_target(A, dpo.whet, assets, model, 2, 6)[0]
        b2 = with_target(B, dpo.whet, assets, model, 2, 6)[0]
        mb, ma = (b1 + b2) / 2, (a1 + a2) / 2
        print(f"| {model} | {mb:.3f} | {ma:.3f} | {tp:.3f} | {td:.3f} | {tp / mb:.2f}x / {td / mb:.2f}x | {tp / ma:.2f}x / {td / ma:.2f}x |", flush=True)
        print(f"  raw before {b1:.3f} {b2:.3f} after {a1:.3f} {a2:.3f}", file=sys.stderr, flush=True)
