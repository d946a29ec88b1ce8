#!/usr/bin/env python3
"""The peer side of `verify-bench`: math-verify 0.8 timed on the same cases, one thread.

    python3 -m venv /tmp/mv && /tmp/mv/bin/pip install math-verify==0.8.0
    /tmp/mv/bin/python rewards/benches/math_verify_bench.py [CASES.jsonl [SECONDS]]

Times `verify(parse(gold), parse(pred))` with library defaults, like `verify-bench` times
`math::verify` with `VerifyConfig::default()`.
"""
import json
import os
import sys
import time

from math_verify import parse, verify

here = os.path.dirname(os.path.abspath(__file__))
path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else os.path.join(here, "..", "..", "..", "shared", "peers", "math-verify", "cases.jsonl")
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
pairs = [(c["gold"], c["pred"]) for c in map(json.loads, open(path, encoding="utf-8"))]

lat = []
start = time.perf_counter()
rounds = 0
while time.perf_counter() - start < secs or rounds == 0:
    for g, p in pairs:
        t = time.perf_counter()
        try:
            verify(parse(g), parse(p))
        except Exception:
            pass
        lat.append(time.perf_counter() - t)
    rounds += 1
total = time.perf_counter() - start
lat.sort()
n = len(lat)
print(f"pairs: {n} ({len(pairs)} distinct x {rounds} rounds), one thread")
print(f"throughput: {n / total:.0f} pairs/s")
print(f"latency: median {lat[n // 2] * 1e6:.1f} us, p99 {lat[round((n - 1) * 0.99)] * 1e6:.1f} us, max {lat[-1] * 1e6:.1f} us")
