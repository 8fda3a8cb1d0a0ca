"""Temp-LoRA replication on PG19 books: base vs Temp-LoRA perplexity by position in the book, block size Δ,
cache reuse vs recompute, and Temp-LoRA with a short window vs the base model with a long one (FLOPs, time).

    python -m bench.replicate                  # the full run (CPU sized; every size is a flag)
    python -m bench.replicate --quick          # smoke test: same settings, fewer and shorter books
    python -m bench.replicate --model DIR --device cuda   # unchanged on an official Llama 3.x checkpoint

Writes bench/results/<run>-<book>.json (templora.evaluate's output + run, book, model, FLOPs), summary.md
and *.png. A run whose JSON exists is skipped (so a crash loses only the run in progress) unless --force;
one made with other settings is an error, never silently mixed in.
"""
import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from bench.common import (BASE_WINDOW, EVAL_BOOKS, MODEL_DIR, REPLICATION, RESULTS, model_label, require_books,
                          require_model, with_default_knobs)
from bench.flops import FlopCounter
from load_llama import load_llama
from protocol import perplexity, position_buckets, write_json, write_text_atomic
from cli import DTYPES, add_knob_flags, config_from_args, progress_bar
from templora import TempLoRAConfig, check_config, config_record, evaluate

COMMAND = "python -m bench.replicate " + shlex.join(sys.argv[1:])
BUCKETS = position_buckets((0, 4096, 8192, 16384, 32768))
AGGREGATES = ["exp(mean NLL)", "paper's token-weighted mean of per-chunk ppl"]
SIZES = {"full": dict(books=4, tokens=32768, ablation_books=1, ablation_tokens=8192),
         "quick": dict(books=1, tokens=2048, ablation_books=1, ablation_tokens=1024)}


class Run(NamedTuple):
    name: str            # main, delta512, recompute-delta512, base-w8192
    book: str
    tokens: int          # scored tokens (the text is cut to tokens + 1: token 0 is context only)
    cfg: TempLoRAConfig
    base_window: int | None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--model-label", help="model name for table headers (default: from the directory name)")
    p.add_argument("--books-dir", default=str(EVAL_BOOKS))
    p.add_argument("--book-ids", help="comma-separated book ids (file stems); default: the first --books by number")
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes {SIZES['quick']}")
    for name, what in [("books", "books in the main and base-window runs"), ("tokens", "scored tokens per book"),
                       ("ablation-books", "books in the Δ and cache ablations (the first ones)"),
                       ("ablation-tokens", "scored tokens per book in the ablations")]:
        key = name.replace("-", "_")
        p.add_argument(f"--{name}", type=int, help=f"{what} (full {SIZES['full'][key]}, quick {SIZES['quick'][key]})")
    add_knob_flags(p, REPLICATION)  # --delta, --context, --window, --keep, --lr, ...: those of the main runs
    p.add_argument("--ablation-delta", type=int, default=512, help="the other Δ of the Δ ablation")
    p.add_argument("--cache-delta", type=int, default=512, help="Δ of the cache ablation (reuse only matters "
                   "when L_x + Δ < W: with L_x + Δ = W the cache is rebuilt before every block anyway)")
    p.add_argument("--base-window", type=int, default=BASE_WINDOW, help="W of the base-only runs (compute trade-off)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="redo runs whose JSON already exists")
    a = p.parse_args(argv)
    for key, value in SIZES["quick" if a.quick else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.book_ids:  # an explicit list sets the number of books
        a.books = len(a.book_ids.split(","))
        a.ablation_books = min(a.ablation_books, a.books)
    if not 0 < a.ablation_books <= a.books or not 0 < a.ablation_tokens <= a.tokens:
        p.error("need 0 < --ablation-books <= --books and 0 < --ablation-tokens <= --tokens")
    if a.ablation_tokens % a.delta:  # the main run's first blocks must cover exactly the ablation's tokens
        p.error(f"--ablation-tokens ({a.ablation_tokens}) must be a multiple of --delta ({a.delta})")
    return a


def plan(a: argparse.Namespace, books: list[str]) -> list[Run]:
    """Main runs first (the headline), then the cheap base-window runs, then the ablations."""
    main = config_from_args(a)
    runs = [Run("main", b, a.tokens, main, None) for b in books]
    runs += [Run(f"base-w{a.base_window}", b, a.tokens, replace(main, templora=False), a.base_window) for b in books]
    subset = books[: a.ablation_books]
    for delta in dict.fromkeys([a.ablation_delta, a.cache_delta]):  # a Δ equal to the main one reuses main
        if delta != a.delta:
            runs += [Run(f"delta{delta}", b, a.ablation_tokens, replace(main, delta=delta), None) for b in subset]
    runs += [Run(f"recompute-delta{a.cache_delta}", b, a.ablation_tokens,
                 replace(main, delta=a.cache_delta, cache_reuse=False), None) for b in subset]
    return runs


def settings(run: Run, a: argparse.Namespace) -> dict:
    """What a stored JSON must match to be reused instead of recomputed."""
    # the knobs as templora.evaluate records them; the adapter step is always the plain one here
    return {"config": config_record(run.cfg, run.base_window) | {"blockwise": 0},
            "model": str(Path(a.model).resolve()), "dtype": a.dtype, "device": a.device,
            "text_tokens": run.tokens + 1}


def run_all(a: argparse.Namespace, runs: list[Run], label: str) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for run in runs:
        path = out / f"{run.name}-{run.book}.json"
        if path.exists() and not a.force:
            stored, wanted = json.loads(path.read_text()), settings(run, a)
            stored["config"] = with_default_knobs(stored.get("config", {}))
            differ = [k for k in wanted if stored.get(k) != wanted[k]]
            if differ:
                sys.exit(f"error: {path} was made with other settings ({', '.join(differ)}); "
                         "rerun with --force or choose another --out")
            results[run.name, run.book] = stored
        else:
            todo.append(run)
    print(f"{len(runs)} runs: {len(results)} already in {out}, {len(todo)} to do", file=sys.stderr)
    if todo:
        compute(a, todo, label, results)
    return {(run.name, run.book): results[run.name, run.book] for run in runs}  # in plan order


def compute(a: argparse.Namespace, todo: list[Run], label: str, results: dict) -> None:
    """Run `todo` on one loaded model (evaluate removes its adapter each time), each JSON written when done."""
    out = Path(a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_llama(a.model, a.device, DTYPES[a.dtype])
    ids_of = {}
    for run in todo:  # every check before the first hour of compute, not after it
        check_config(run.cfg, model)
        if run.book not in ids_of:
            text = (Path(a.books_dir) / f"{run.book}.txt").read_text(encoding="utf-8")
            ids_of[run.book] = tok.encode(text, bos=tok.bos_id is not None)
        if len(ids_of[run.book]) < run.tokens + 1:
            sys.exit(f"error: book {run.book} has {len(ids_of[run.book])} tokens, fewer than {run.tokens} + 1")
    for i, run in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {run.name} book {run.book}: {run.tokens} tokens, Δ={run.cfg.delta}", file=sys.stderr)
        with FlopCounter(model) as counter:  # each block keeps its own FLOPs, by phase
            r = evaluate(model, ids_of[run.book][: run.tokens + 1], run.cfg, run.base_window, progress_bar,
                         extras=lambda: {"flops": counter.take()})
        r |= settings(run, a) | {"run": run.name, "book": run.book, "model_label": label, "command": COMMAND,
                                 "threads": torch.get_num_threads(), "flops": counter.totals}
        path = out / f"{run.name}-{run.book}.json"
        write_json(path, r)  # atomic: never a half-written JSON that a resume would trust
        tl = f", Temp-LoRA {r['ppl_templora']:.3f}" if r["ppl_templora"] else ""
        print(f"\n  ppl base {r['ppl_base']:.3f}{tl}; {r['timings']['total_s']:.0f} s -> {path}", file=sys.stderr)
        results[run.name, run.book] = r


# ----------------------------------------------------------------------------- numbers

def ppl(chunks: list[dict], key: str) -> tuple[float, float]:
    """(exp(sum NLL / sum tokens), the paper's sum(tokens_i * exp(nll_i / tokens_i)) / sum(tokens_i))."""
    name = key.removeprefix("nll_")
    return (perplexity(chunks, name),
            sum(c["tokens"] * perplexity([c], name) for c in chunks) / sum(c["tokens"] for c in chunks))


def change(chunks: list[dict], agg: int) -> float:
    """Temp-LoRA vs base on the same windows, in percent (negative: Temp-LoRA is better)."""
    return 100 * (ppl(chunks, "nll_templora")[agg] / ppl(chunks, "nll_base")[agg] - 1)


def in_bucket(chunks, lo, hi):
    return [c for c in chunks if lo <= c["start"] < hi]


def first(r: dict, tokens: int) -> list[dict]:
    """The blocks of a run that lie within its first `tokens` scored tokens."""
    return [c for c in r["chunks"] if c["start"] + c["tokens"] <= tokens + 1]


def cost(chunks, phases=("score_templora", "train")) -> float:
    return sum(c["flops"][p] for c in chunks for p in phases)


def pct(new, old):
    return 100 * (new / old - 1)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows), ""]


def commands(rs):
    return "Produced by: " + ", ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rs))


def settings_line(r: dict, tokens: int | None = None, delta=None, cache=None) -> str:
    """The knobs of run r, with the ones a table varies (Δ, cache reuse) or cuts (tokens) overridden."""
    c = r["config"]
    return (f"Settings: Δ={delta or c['delta']}, L_T={c['context']}, W={c['window']}, L_x={c['keep']}, "
            f"rank {c['rank']}, α {c['alpha']:g}, lr {c['lr']:g} (warm-up {c['warmup_blocks']} blocks from "
            f"lr/{c['warmup_blocks']}), {c['epochs']} steps/block, dropout {c['dropout']}, cache reuse "
            f"{cache or ('on' if c['cache_reuse'] else 'off')}; {r['dtype']} on {r['device']}; first "
            f"{tokens or r['text_tokens'] - 1} tokens of each book.")


def section_positions(main: list[dict], label: str) -> list[str]:
    pooled = [c for r in main for c in r["chunks"]]
    buckets = [(lo, hi, name) for lo, hi, name in BUCKETS if in_bucket(pooled, lo, hi)]
    out = [f"## 1. Base vs Temp-LoRA perplexity by position in the book — {label}", "", commands(main), "",
           settings_line(main[0]) + " Base and Temp-LoRA score the same windows (W above).", ""]

    def cells(chunks, agg):  # one per bucket, then the whole text
        parts = [in_bucket(chunks, lo, hi) for lo, hi, _ in buckets] + [chunks]
        return [f"{ppl(p, 'nll_base')[agg]:.2f} → {ppl(p, 'nll_templora')[agg]:.2f} ({change(p, agg):+.1f}%)"
                for p in parts]
    for agg, name in enumerate(AGGREGATES):
        mean = [sum(change(in_bucket(r["chunks"], lo, hi), agg) for r in main) / len(main) for lo, hi, _ in buckets]
        mean.append(sum(change(r["chunks"], agg) for r in main) / len(main))
        out += [f"**{name}**: base → Temp-LoRA (change)", ""] + table(
            ["book", *(n for _, _, n in buckets), "all"],
            [[r["book"], *cells(r["chunks"], agg)] for r in main] + [["pooled", *cells(pooled, agg)]]
            + [["mean of per-book changes", *(f"{m:+.1f}%" for m in mean)]])
    steps = [change(in_bucket(pooled, lo, hi), 1) for lo, hi, _ in buckets]
    overall = [change(pooled, agg) for agg in (0, 1)]
    helped = sum(change(r["chunks"], 0) < 0 for r in main)
    grows = ("n/a (one position bucket)" if len(steps) < 2 else
             "yes" if all(b <= a for a, b in zip(steps, steps[1:])) else
             "partly (last bucket below the first, not monotone)" if steps[-1] < steps[0] else "no")
    span = (max(c["start"] + c["tokens"] for c in pooled) - 1) / 1024
    versus = ("reproduces (at least as large)" if overall[1] <= -3.6 else
              "same direction, smaller" if overall[1] < 0 else "does not reproduce")
    return out + [
        f"- Temp-LoRA lowers perplexity overall: {'yes' if overall[0] < 0 else 'no'} ({overall[0]:+.2f}% "
        f"{AGGREGATES[0]}, {overall[1]:+.2f}% paper's mean); lower on {helped} of {len(main)} books.",
        f"- Reduction grows with position: {grows} (pooled, paper's mean: "
        + " → ".join(f"{n} {s:+.1f}%" for (_, _, n), s in zip(buckets, steps)) + ").",
        f"- Paper (Llama 2 7B, PG19): −3.6% on 0–100K tokens, growing to −13.2% beyond 500K. These books are cut "
        f"at {span:g}K tokens, inside the paper's first bucket, so −3.6% is the comparable figure: {versus}.", ""]


def row(name, chunks, wall):
    b, t = ppl(chunks, "nll_base")[0], ppl(chunks, "nll_templora")[0]
    return [name, len(chunks), f"{b:.3f}", f"{t:.3f}", f"{pct(t, b):+.2f}%", f"{change(chunks, 1):+.2f}%",
            f"{cost(chunks):.3g}", f"{wall:.0f}"]


ROW_HEADER = ["", "blocks", "ppl base", "ppl Temp-LoRA", "change", "change (paper's mean)", "Temp-LoRA FLOPs",
              "wall s (base + Temp-LoRA)"]


def section_delta(main, by_delta, tokens, label):
    rows = {main[0]["config"]["delta"]: [c for r in main for c in first(r, tokens)]}
    rows |= {d: [c for r in rs for c in r["chunks"]] for d, rs in by_delta.items()}
    out = [f"## 2. Block size Δ — {label}", "", commands([*main, *(r for rs in by_delta.values() for r in rs)]), "",
           settings_line(main[0], tokens, delta="see table") + f" Books {', '.join(r['book'] for r in main)}; "
           f"the Δ={main[0]['config']['delta']} row is the main runs' first blocks.", ""]
    out += table(["Δ", *ROW_HEADER[1:]], [row(d, ch, sum(c["wall_s"] for c in ch)) for d, ch in sorted(rows.items())])
    if len(rows) < 2:
        return out + ["- Only one Δ was run: nothing to compare.", ""]
    (small, s), (large, l) = min(rows.items()), max(rows.items())
    better = ppl(s, "nll_templora")[0] < ppl(l, "nll_templora")[0]
    return out + [f"- Smaller Δ ({small}) gives lower Temp-LoRA perplexity than Δ={large}: "
                  f"{'yes' if better else 'no'}, at {cost(s) / cost(l):.2f}x the Temp-LoRA FLOPs.", ""]


def stale(chunks) -> int:
    """Blocks scored on K/V that older adapters left in the cache (block 0 has no older adapter)."""
    return sum(not c["recomputed"] for c in chunks[1:])


def section_cache(reuse, recompute, main, tokens, label):
    ch_re = [c for r in reuse for c in first(r, tokens)]
    ch_no = [c for r in recompute for c in r["chunks"]]
    wall = [sum(c["wall_s"] for c in ch) for ch in (ch_re, ch_no)]
    m = main[0]["config"]
    out = [f"## 3. Cache reuse vs recompute after every update — {label}", "", commands([*reuse, *recompute]), "",
           settings_line(recompute[0], cache="see table") + f" Books {', '.join(r['book'] for r in recompute)}.", ""]
    out += table(["cache", *ROW_HEADER[1:]], [row("reuse (paper)", ch_re, wall[0]),
                                              row("recompute after every update", ch_no, wall[1])])
    d = pct(ppl(ch_no, "nll_templora")[0], ppl(ch_re, "nll_templora")[0])
    return out + [f"- Blocks scored on a reused cache (K/V from older adapters): {stale(ch_re)} of {len(ch_re)}; "
                  "the others start from a cache rebuilt at the window boundary, the same in both modes. In the "
                  f"main runs (Δ={m['delta']}, W={m['window']}, L_x={m['keep']}): "
                  f"{sum(stale(r['chunks']) for r in main)} of {sum(len(r['chunks']) for r in main)}.",
                  f"- Recompute vs reuse, Temp-LoRA perplexity: {d:+.2f}% (negative: recomputing is better, i.e. "
                  f"reuse costs quality); reuse saves FLOPs: {'yes' if cost(ch_re) < cost(ch_no) else 'no'} "
                  f"({pct(cost(ch_re), cost(ch_no)):+.1f}% FLOPs, {pct(wall[0], wall[1]):+.1f}% wall time).", ""]


def section_tradeoff(main, base, label):
    pooled = [c for r in main for c in r["chunks"]]
    pooled_b = [c for r in base for c in r["chunks"]]
    wb, wt = base[0]["config"]["base_window"], main[0]["config"]["window"]
    seconds = lambda rs, *keys: sum(r["timings"][k] for r in rs for k in keys)  # noqa: E731
    rows = [(f"base, W={wb} (long window)", ppl(pooled_b, "nll_base"), cost(pooled_b, ["score_base"]),
             seconds(base, "score_base_s")),
            (f"Temp-LoRA, W={wt}", ppl(pooled, "nll_templora"), cost(pooled),
             seconds(main, "score_templora_s", "train_s")),
            (f"base, W={wt} (reference)", ppl(pooled, "nll_base"), cost(pooled, ["score_base"]),
             seconds(main, "score_base_s"))]
    (_, p0, f0, t0), (_, p, f, t) = rows[:2]
    out = [f"## 4. Compute trade-off: Temp-LoRA with W={wt} vs the base model with W={wb} — {label}", "",
           commands([*main, *base]), "", settings_line(main[0]) + f" Books {', '.join(r['book'] for r in main)}, "
           "pooled. FLOPs from the model config (bench/flops.py): a forward is 2 x linear params (incl. head) per "
           "token + 4 x layers x heads x head_dim per attended key + LoRA; an adapter step is 2 x (linear + head) "
           "+ 3 x (attention + LoRA) of its forward (the frozen base needs input gradients only). Temp-LoRA's cost "
           "is its scoring + training, not the base scoring it is compared with. Wall time: JSON timings.", ""]
    out += table(["setting", "ppl", "ppl (paper's mean)", f"vs base W={wb}", "FLOPs", "vs base", "wall s", "vs base"],
                 [[name, f"{q[0]:.3f}", f"{q[1]:.3f}", f"{pct(q[0], p0[0]):+.1f}%", f"{fl:.3g}",
                   f"{pct(fl, f0):+.1f}%", f"{s:.0f}", f"{pct(s, t0):+.1f}%"] for name, q, fl, s in rows])
    yes = lambda x: "yes" if x < 0 else "no"  # noqa: E731
    return out + [f"- Temp-LoRA (W={wt}) vs base (W={wb}): perplexity {pct(p[0], p0[0]):+.1f}%, FLOPs "
                  f"{pct(f, f0):+.1f}%, wall time {pct(t, t0):+.1f}% (paper's economical setting: −3.8%, −70.5%, "
                  f"−51.5%). Lower perplexity: {yes(p[0] - p0[0])}; fewer FLOPs: {yes(f - f0)}; less time: "
                  f"{yes(t - t0)}.", ""]


def plots(main, base, out: Path, label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    block_ppl = lambda chunks, key: [perplexity([c], key.removeprefix("nll_")) for c in chunks]  # noqa: E731
    r = main[0]
    mid = lambda chunks: [(c["start"] + c["tokens"] / 2) / 1024 for c in chunks]  # noqa: E731
    x = mid(r["chunks"])
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6), height_ratios=(2, 1))
    top.plot(x, block_ppl(r["chunks"], "nll_base"), ".-", label=f"base, W={r['config']['window']}")
    top.plot(x, block_ppl(r["chunks"], "nll_templora"), ".-", label=f"Temp-LoRA, W={r['config']['window']}")
    for b in (b for b in base if b["book"] == r["book"]):
        top.plot(mid(b["chunks"]), block_ppl(b["chunks"], "nll_base"), ":",
                 label=f"base, W={b['config']['base_window']}")
    top.set(ylabel=f"perplexity of the block (Δ={r['config']['delta']})")
    top.set_title(f"PG19 book {r['book']}\n{label}", fontsize=8)
    top.legend()
    # the difference is a few percent: on the perplexity scale it hides under the block-to-block swings
    bottom.bar(x, [100 * (t / b - 1) for b, t in zip(block_ppl(r["chunks"], "nll_base"),
                                                     block_ppl(r["chunks"], "nll_templora"))],
               width=0.8 * r["config"]["delta"] / 1024)
    bottom.axhline(0, color="black", lw=0.5)
    bottom.set(xlabel="position in the book (K tokens, middle of each block)", ylabel="Temp-LoRA vs base, %")
    fig.tight_layout()
    fig.savefig(out / "ppl_along_book.png", dpi=120)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [n for lo, hi, n in BUCKETS if in_bucket(main[0]["chunks"], lo, hi)]
    per_book = [[change(in_bucket(r["chunks"], lo, hi), 0) for lo, hi, n in BUCKETS if n in names] for r in main]
    for r, ys in zip(main, per_book):
        ax.plot(names, ys, "o-", alpha=0.6, label=f"book {r['book']}")
    ax.plot(names, [sum(col) / len(col) for col in zip(*per_book)], "ks-", lw=2.5, label="mean of books")
    ax.axhline(-3.6, color="gray", ls="--", label="paper, 0–100K (Llama 2 7B)")
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="position in the book (tokens)", ylabel="Temp-LoRA vs base, % (exp mean NLL)")
    ax.set_title(f"Perplexity change by position\n{label}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reduction_by_position.png", dpi=120)
    plt.close("all")


def main(argv=None) -> None:
    a = parse_args(argv)
    require_model(a.model)
    require_books(a.books_dir, "--books-dir", a.book_ids.split(",") if a.book_ids else ())
    books = a.book_ids.split(",") if a.book_ids else sorted(
        (p.stem for p in Path(a.books_dir).glob("*.txt")), key=lambda s: (len(s), s))[: a.books]
    if len(books) < a.books:
        sys.exit(f"error: {a.books_dir} has {len(books)} books, --books asks for {a.books}")
    label = a.model_label or model_label(a.model)
    results = run_all(a, plan(a, books), label)
    get = lambda name: [r for (n, _), r in results.items() if n == name]  # noqa: E731
    main_runs, base_runs = get("main"), get(f"base-w{a.base_window}")
    by_delta = {a.ablation_delta: get(f"delta{a.ablation_delta}")} if a.ablation_delta != a.delta else {}
    reuse = get(f"delta{a.cache_delta}") if a.cache_delta != a.delta else main_runs[: a.ablation_books]
    lines = [f"# Temp-LoRA replication on PG19 — {label}", "",
             f"Books {', '.join(books)} from {a.books_dir}. This summary and the plots: `{COMMAND}`; each table "
             "names the commands that produced its runs (one JSON per run in this folder).", "",
             *section_positions(main_runs, label), *section_delta(main_runs[: a.ablation_books], by_delta,
                                                                  a.ablation_tokens, label),
             *section_cache(reuse, get(f"recompute-delta{a.cache_delta}"), main_runs, a.ablation_tokens, label),
             *section_tradeoff(main_runs, base_runs, label)]
    out = Path(a.out)
    write_text_atomic(out / "summary.md", "\n".join(lines))
    plots(main_runs, base_runs, out, label)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
