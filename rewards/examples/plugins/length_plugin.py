#!/usr/bin/env python3
"""Example whet reward plugin (exec transport, standard library only).

Protocol: one JSON request per line on stdin, one JSON response per line on stdout.
Anything written to stderr is forwarded to whet's logs.

Reward: 1 - len(completion) / target_chars, clipped to [-1, 1] (shorter is better), with
`target_chars` from the request's `params` (default 1000). Samples whose row has
`"skip": true` get null (not applicable). A per-sample metric `chars` is returned.

For tests, a completion containing one of these markers makes the plugin misbehave:
  __crash__      exit(3) without answering
  __hang__       sleep forever
  __malformed__  print a line that is not JSON
  __wrong_size__ answer with one reward too few
  __crash_once__ exit(3) unless the file named by $WHET_PLUGIN_STATE exists (then create it first)
and WHET_PLUGIN_STALL=1 makes it sleep forever before reading anything.
"""
import json
import os
import sys
import time


def score(sample, target):
    if sample.get("row", {}).get("skip"):
        return None
    n = len(sample["completion"])
    return max(-1.0, min(1.0, 1.0 - n / target))


def main():
    if os.environ.get("WHET_PLUGIN_STALL") == "1":
        time.sleep(3600)
    print("length_plugin ready", file=sys.stderr, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        samples = req["samples"]
        text = " ".join(s["completion"] for s in samples)
        if "__crash_once__" in text:
            state = os.environ.get("WHET_PLUGIN_STATE", "")
            if state and not os.path.exists(state):
                open(state, "w").close()
                print("crashing once on purpose", file=sys.stderr, flush=True)
                sys.exit(3)
        if "__crash__" in text:
            print("crashing on purpose", file=sys.stderr, flush=True)
            sys.exit(3)
        if "__hang__" in text:
            time.sleep(3600)
        if "__malformed__" in text:
            print("this is not json", flush=True)
            continue
        target = float((req.get("params") or {}).get("target_chars", 1000))
        rewards = [score(s, target) for s in samples]
        if "__wrong_size__" in text:
            rewards = rewards[:-1]
        resp = {
            "batch_id": req["batch_id"],
            "rewards": rewards,
            "metrics": {"chars": [len(s["completion"]) for s in samples]},
        }
        print(json.dumps(resp), flush=True)


if __name__ == "__main__":
    main()
