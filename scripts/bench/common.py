"""What the side-by-side benchmarks share: where things are, the assets, and one whet run."""
import json
import os
import subprocess
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRL = os.environ.get("TRL_BENCH_DIR", os.path.join(ROOT, "..", "shared", "bench", "trl"))
VENV_PY = os.environ.get("TRL_PYTHON", "/tmp/trl-venv/bin/python")


def ensure_assets(assets):
    """Builds the harness's models, tokenizer and data in `assets` unless they are there."""
    if not os.path.exists(os.path.join(assets, "manifest.json")):
        subprocess.run([VENV_PY, os.path.join(TRL, "assets.py"), "--out", assets], check=True)


def random_llama_recipe(run_keys, stage, vocab=32000, hidden=768, inter=2048):
    """A recipe (a format string with `{out}`) for SFT-style runs on a random 8-layer Llama — by default the
    81 M-parameter one the memory benchmarks use — with extra `[run]` keys and a `[[stage]]` body."""
    model = (f'config = {{{{ model_type = "llama", vocab_size = {vocab}, hidden_size = {hidden}, intermediate_size = {inter}, '
             'num_hidden_layers = 8, num_attention_heads = 12, num_key_value_heads = 12, max_position_embeddings = 1024, '
             'tie_word_embeddings = true }}')
    return (f'\n[model]\n{model}\ntokenizer = "builtin:bytes"\ndevice = "cpu"\n\n[run]\noutput_dir = "{{out}}"\nthreads = 1\n'
            f'save_every = 0\n{run_keys}\n[[stage]]\n{stage}')


def toml_inline(d):
    """A dict as a TOML inline table (for `[model] config = {...}`)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    return "{ " + ", ".join(f"{k} = {val(v)}" for k, v in d.items()) + " }"


def random_model_recipe(cfg, device, dtype, out, run_keys=""):
    """The `[model]` and `[run]` tables of a run on a random-init model of config `cfg` (a dict of config.json
    keys) with the byte tokenizer, logging every step and saving nothing; `run_keys`: more `[run]` lines."""
    return f"""
[model]
config = {toml_inline(cfg)}
tokenizer = "builtin:bytes"
device = "{device}"
dtype = "{dtype}"

[run]
output_dir = "{out}"
seed = 1
log_every = 1
save_every = 0
report_to = "none"
{run_keys}"""


TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def run_whet(recipe, key, args=()):
    """Runs target/release/train (under $CARGO_TARGET_DIR when set) on `recipe` (a format string with an
    `{out}` field) with extra command-line `args` and returns the metrics.jsonl records that have `key`."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.toml")
        out = os.path.join(d, "out")
        with open(path, "w") as f:
            f.write(recipe.replace("{out}", out))
        subprocess.run([os.path.join(TARGET, "release", "train"), "--recipe", path, "--resume", "never", *args],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return [r for r in (json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))) if key in r]


def run_trl(args):
    """Runs the harness's workloads.py with `args` in the TRL venv; returns its first JSON record."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.jsonl")
        subprocess.run([VENV_PY, os.path.join(TRL, "workloads.py"), *args, "--out", out], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return [json.loads(l) for l in open(out)][0]


class GpuMemPoll:
    """nvidia-smi's memory.used (MiB), sampled every 50 ms while a process runs (`enabled` False: reads 0)."""

    def __init__(self, enabled=True):
        self.enabled, self.peak = enabled, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def read(self):
        if not self.enabled:
            return 0
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return int(out.split()[0])
        except Exception:
            return 0

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
