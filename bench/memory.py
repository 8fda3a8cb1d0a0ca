"""Peak memory of `templora.py eval` as the text grows: the window, not the text, should bound it.

    python -m bench.memory [--model DIR] [--text BOOK] [--tokens 8192,32768,131072] [--out bench/results/memory.json]

For each N, in a fresh child process each (peak RSS is a high-water mark, so one run per process):
  templora  python templora.py eval --max-tokens N  with the Temp-LoRA knobs below (W = --window)
  base      python templora.py eval --max-tokens N --no-templora --window --base-window: the base model
            alone with its full window (8192 for SmolLM2), the usual way to score a long text
plus once `load`: the same process up to the start of eval (model loaded, whole book tokenized), the floor.
Peak RSS is the child's own ru_maxrss (os.wait4), not the largest of all children.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BASE_WINDOW, BOOK, MODEL_DIR, REPLICATION, REPO, RESULTS, require_books, require_model
from protocol import write_json

# what cmd_eval does before evaluate(): load the checkpoint, tokenize the whole text (run from the repo root)
LOAD_ONLY = """
import torch
from load_llama import load_llama
from cli import DTYPES
torch.set_num_threads({threads})
model, tok = load_llama({model!r}, dtype=DTYPES[{dtype!r}])
ids = tok.encode(open({text!r}, encoding="utf-8").read(), bos=tok.bos_id is not None)
print(len(ids), "tokens")
"""


def run_child(cmd: list[str], log) -> dict:
    """Run cmd to completion; its wall time, exit status and own peak RSS (MiB)."""
    log("  $ " + " ".join(cmd))
    t = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone (ru_maxrss: KiB on Linux)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if child.returncode != 0:
        raise RuntimeError(f"exit {child.returncode}: {' '.join(cmd)}\n{output[-2000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": seconds, "cpu_s": usage.ru_utime + usage.ru_stime,
            "output_tail": output.strip().splitlines()[-1] if output.strip() else ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--text", default=str(BOOK), help="a book with more tokens than the largest N")
    p.add_argument("--tokens", default="8192,32768,131072", help="comma-separated N (eval --max-tokens)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--delta", type=int, default=REPLICATION.delta)
    p.add_argument("--context", type=int, default=REPLICATION.context)
    p.add_argument("--window", type=int, default=REPLICATION.window)
    p.add_argument("--keep", type=int, default=REPLICATION.keep)
    p.add_argument("--epochs", type=int, default=REPLICATION.epochs)
    p.add_argument("--lr", default=str(REPLICATION.lr), help="as in bench/replicate.py (memory does not depend on it)")
    p.add_argument("--base-window", type=int, default=BASE_WINDOW, help="W of the base-only runs")
    p.add_argument("--base-keep", type=int, default=None, help="L_x of the base-only runs (default W/2)")
    p.add_argument("--skip", default="", help="comma-separated runs to leave out: load, templora, base")
    p.add_argument("--out", default=str(RESULTS / "memory.json"))
    a = p.parse_args(argv)
    require_model(a.model)
    require_books(a.text, "--text")
    sizes = [int(x) for x in a.tokens.split(",") if x.strip()]
    skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    base_keep = a.base_keep or a.base_window // 2

    def log(s):
        print(s, file=sys.stderr, flush=True)

    common = [sys.executable, "templora.py", "eval", "--model", a.model, "--text", a.text, "--dtype", a.dtype,
              "--threads", str(a.threads), "--delta", str(a.delta), "--quiet"]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="templora-memory-") as tmp:
        if "load" not in skip:
            log("load only")
            code = LOAD_ONLY.format(threads=a.threads, model=a.model, dtype=a.dtype, text=a.text)
            runs["load"] = run_child([sys.executable, "-c", code], log)
        for n in sizes:
            variants = {
                "templora": ["--context", str(a.context), "--window", str(a.window), "--keep", str(a.keep),
                             "--epochs", str(a.epochs), "--lr", a.lr],
                "base": ["--no-templora", "--window", str(a.base_window), "--keep", str(base_keep)],
            }
            for kind, flags in variants.items():
                if kind in skip:
                    continue
                log(f"{kind}, N={n}")
                out = Path(tmp) / f"{kind}_{n}.json"
                r = run_child(common + ["--max-tokens", str(n), "--out", str(out)] + flags, log)
                result = json.loads(out.read_text())
                r |= {"tokens": n, "scored_tokens": result["scored_tokens"], "ppl_base": result["ppl_base"],
                      "ppl_templora": result["ppl_templora"], "eval_s": result["timings"]["total_s"],
                      "config": result["config"]}
                if result["text_tokens"] < n:
                    raise ValueError(f"{a.text} has only {result['text_tokens']} tokens, fewer than N={n}")
                runs[f"{kind}_{n}"] = r
                log(f"  peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.0f}s")

    print(f"# peak RSS of `templora.py eval` ({Path(a.model).name}, {a.dtype}, {a.threads} threads, "
          f"{Path(a.text).name})\n")
    print(f"templora: Δ={a.delta} L_T={a.context} W={a.window} L_x={a.keep}, {a.epochs} epochs, lr {a.lr}; "
          f"base: --no-templora W={a.base_window} L_x={base_keep}\n")
    print("| run | tokens | peak RSS MiB | wall s | ppl base | ppl templora |")
    print("|---|---|---|---|---|---|")
    if "load" in runs:
        r = runs["load"]
        print(f"| load model + tokenize book | - | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} | | |")
    for key, r in runs.items():
        if key == "load":
            continue
        t = f"{r['ppl_templora']:.3f}" if r["ppl_templora"] is not None else ""
        print(f"| {key.split('_')[0]} | {r['tokens']} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} | "
              f"{r['ppl_base']:.3f} | {t} |")
    write_json(a.out, {"config": vars(a), "runs": runs})
    print(f"\n-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
