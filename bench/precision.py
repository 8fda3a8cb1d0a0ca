"""Is the fast bf16 path good enough? Temp-LoRA perplexity on a real book, bf16 base vs fp32 everything.

    python -m bench.precision [--model DIR] [--text BOOK] [--tokens 8192] [--out bench/results/precision.json]

Runs the same `templora.evaluate` twice on the same token ids, same seed, same knobs (bench/replicate.py's):
  float32   base weights, activations, adapter and AdamW state all fp32 (the reference)
  bfloat16  base weights and activations bf16; the adapter and its AdamW state stay fp32 (lora.py stores
            them in fp32 and multiplies in the activations' dtype), the CLI's --dtype bfloat16
and reports both perplexities and the relative difference of Temp-LoRA's, within a bound of 1% (`--bound`).
"""
import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import BOOK, MODEL_DIR, REPLICATION, RESULTS, require_books, require_model
from load_llama import load_llama
from protocol import write_json
from cli import DTYPES, add_knob_flags, config_from_args, progress_bar
from templora import evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--text", default=str(BOOK))
    p.add_argument("--tokens", type=int, default=8192, help="scored tokens (the text is cut to tokens + 1)")
    add_knob_flags(p, REPLICATION)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bound", type=float, default=1.0, help="allowed |ppl_bf16 / ppl_fp32 - 1| in percent")
    p.add_argument("--out", default=str(RESULTS / "precision.json"))
    a = p.parse_args(argv)
    require_model(a.model)
    require_books(a.text, "--text")
    torch.set_num_threads(a.threads)
    cfg = config_from_args(a)

    runs = {}
    for name, dtype in DTYPES.items():
        model, tok = load_llama(a.model, dtype=dtype)
        ids = tok.encode(Path(a.text).read_text(encoding="utf-8"), bos=tok.bos_id is not None)[: a.tokens + 1]
        print(f"{name}: {len(ids) - 1} scored tokens", file=sys.stderr)
        t = time.perf_counter()
        r = evaluate(model, ids, cfg, progress=progress_bar)
        seconds = time.perf_counter() - t
        print(file=sys.stderr)
        runs[name] = {"ppl_base": r["ppl_base"], "ppl_templora": r["ppl_templora"], "wall_s": seconds,
                      "tokens_per_s": r["scored_tokens"] / seconds, "skipped_updates": r["skipped_updates"],
                      "train_loss_last": r["chunks"][-1]["train_loss"][-1]}
        del model

    f32, b16 = runs["float32"], runs["bfloat16"]
    diff = {k: 100 * (b16[k] / f32[k] - 1) for k in ("ppl_base", "ppl_templora")}
    ok = abs(diff["ppl_templora"]) <= a.bound
    print(f"# bf16 vs fp32 ({Path(a.model).name}, {Path(a.text).name}, {a.tokens} scored tokens, "
          f"Δ={a.delta} L_T={a.context} W={a.window} L_x={a.keep} lr {a.lr:g}, {a.threads} threads)\n")
    print("| dtype | ppl base | ppl Temp-LoRA | Temp-LoRA vs base | wall s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['ppl_base']:.4f} | {r['ppl_templora']:.4f} | "
              f"{100 * (r['ppl_templora'] / r['ppl_base'] - 1):+.2f}% | {r['wall_s']:.0f} | {r['tokens_per_s']:.1f} |")
    print(f"\nbf16 vs fp32: base ppl {diff['ppl_base']:+.3f}%, Temp-LoRA ppl {diff['ppl_templora']:+.3f}% "
          f"({'within' if ok else 'OUTSIDE'} the ±{a.bound:g}% bound); bf16 is "
          f"{f32['wall_s'] / b16['wall_s']:.2f}x faster end to end")
    write_json(a.out, {"config": vars(a) | {"templora": asdict(cfg)}, "runs": runs,
                       "relative_diff_percent": diff, "within_bound": ok})
    print(f"-> {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
