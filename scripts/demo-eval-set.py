#!/usr/bin/env python3
"""Writes 600 held-out arithmetic problems for evaluating the demo's checkpoints with `train eval` (JSONL,
{"problem", "answer"}): random.Random(5), each operand of 1 or 2 digits, + or -, a subtraction's operands ordered
so that the answer is not negative, in the demo's prompt format. Independent of the recipe's own held-out set.

    python3 scripts/demo-eval-set.py > /tmp/demo-eval.jsonl
    target/release/train --threads 1 eval --model runs/demo/checkpoints/s03-final/model --data /tmp/demo-eval.jsonl \\
        --max-tokens 8 --temperature 0 --seeds 1
"""
import json
import random

rng = random.Random(5)
for _ in range(600):
    a = rng.randint(0, 10 ** rng.randint(1, 2) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, 2) - 1)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    print(json.dumps({"problem": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b)}))
