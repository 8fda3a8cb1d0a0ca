"""Stretching the window: SmolLM2-135M (trained on L = 8K tokens) read at L·s = 16K (s = 2) with plain RoPE,
PI, NTK, YaRN, Llama 3's scaling and the factors DCIS searches (methods/dcis.py); then Temp-LoRA with a
window past the original length on the DCIS-stretched model.

    python -m bench.dcis --device cuda --model DIR --books-dir DIR --train-books-dir DIR --out DIR
    python -m bench.dcis --device cuda ... --offsets 10          # the paper's full budget: 620 evaluations
    python -m bench.dcis --quick --model TINY ...                # smoke test on a tiny random checkpoint (CPU)

The search, then two parts (--parts), each writing its results into --out as they complete:
  search     DCIS from YaRN's factors, scored on the first L·s tokens of one pg19-test book (--search-book):
             dcis-search.json logs every evaluation (a rerun replays it: nothing is redone; a larger
             --max-evals continues it), dcis-checkpoint/ is the result as a `longrope` checkpoint
             (config.json + symbolic links to the model's weights and tokenizer).
  ppl        perplexity of the first N tokens of each held-out pg19-templora40 book (--eval-books, never
             searched on), one forward per (method, N, book) for N in --lengths; lengths past L·s only for
             the --long-methods best methods at L·s. dcis.json (every NLL, pooled perplexities, the search's
             summary) and dcis.png (perplexity against length, one line per method).
  templora   templora.evaluate (the replication's knobs, Δ=1024) on the replication books (--templora-books,
             32,768 scored tokens each): W = L·s, L_x = W/2 on the DCIS-stretched model, and W = L, L_x = L/2
             on the plain one; base and Temp-LoRA scorers. dcis-stretched-w<W>-<book>.json and
             dcis-plain-w<L>-<book>.json in the protocol's shape (rows of bench/compare.py).
An entry whose result exists is skipped; results made with other settings are refused (exit 2).
"""
import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from bench.common import EVAL_BOOKS, MODEL_DIR, REPLICATION, TRAIN_BOOKS, model_label, require_books, require_model
from bench.flops import FlopCounter
from load_llama import CheckpointError, args_from_config, load_model, load_tokenizer, read_json
from methods import dcis
from cli import DTYPES
from templora import evaluate

COMMAND = "python -m bench.dcis " + shlex.join(sys.argv[1:])
PARTS = ("ppl", "templora")  # after the search, which always runs (replaying its log when there is one)
SIZES = {  # --quick: a tiny random checkpoint that we pretend was trained on 64 tokens
    "full": dict(original=None, lengths="4096,8192,16384,32768", offsets=8, delta=1024, context=512,
                 templora_tokens=32768),
    "quick": dict(original=64, lengths="32,64,128,256", offsets=3, delta=32, context=32, templora_tokens=128)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR), help="checkpoint with plain RoPE (SmolLM2-135M)")
    p.add_argument("--model-label", help="model name for the JSONs and the plot (default: from the directory name)")
    p.add_argument("--books-dir", default=str(EVAL_BOOKS), help="held-out books (pg19-templora40)")
    p.add_argument("--train-books-dir", default=str(TRAIN_BOOKS), help="the search's book (pg19-test)")
    p.add_argument("--search-book", default="10146", help="book id in --train-books-dir that DCIS is scored on")
    p.add_argument("--eval-books", default="1684,17769,2021,349", help="book ids of the perplexity-by-length part")
    p.add_argument("--templora-books", default="349,718,1684,2021", help="book ids of the Temp-LoRA part")
    p.add_argument("--stretch", type=float, default=2.0, help="s: the model reads L·s tokens")
    p.add_argument("--original", type=int, help="L: the trained length (default: max_position_embeddings)")
    p.add_argument("--lengths", help=f"tokens per perplexity forward (full {SIZES['full']['lengths']})")
    p.add_argument("--long-methods", type=int, default=3, help="methods (the best at L·s) run at lengths past L·s")
    p.add_argument("--init", default="yarn", choices=["yarn", "pi", "ntk"], help="DCIS's starting factors")
    p.add_argument("--offsets", type=int, help="C: offsets tried per group (paper 10 = 620 evaluations at "
                   f"head_dim 64; default {SIZES['full']['offsets']} = 496, about 2 minutes on an H100)")
    p.add_argument("--min-group", type=int, default=1, help="finest group size in pairs (paper 1)")
    p.add_argument("--max-evals", type=int, help="stop the search after this many evaluations (default: none)")
    p.add_argument("--delta", type=int, help="Temp-LoRA part: Δ (full 1024)")
    p.add_argument("--context", type=int, help="Temp-LoRA part: L_T (full 512)")
    p.add_argument("--templora-tokens", type=int, help="Temp-LoRA part: scored tokens per book (full 32768)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run, of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes {SIZES['quick']}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 elsewhere")
    p.add_argument("--out", default="bench/results/dcis")
    a = p.parse_args(argv)
    for key, value in SIZES["quick" if a.quick else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.parts = [part for part in a.parts.split(",") if part]  # "" runs the search alone
    if set(a.parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(set(a.parts) - set(PARTS))} (of {', '.join(PARTS)})")
    try:
        a.lengths = sorted({int(n) for n in a.lengths.split(",")})
    except ValueError:
        p.error(f"--lengths: expected comma-separated integers, got {a.lengths!r}")
    if not a.stretch > 1 or min(a.lengths) < 2 or a.offsets < 2:
        p.error("need --stretch > 1, --lengths of at least 2 tokens and --offsets >= 2")
    return a


# ----------------------------------------------------------------------------- shared

def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def say(message: str) -> None:
    print(message, flush=True)


def read_book(folder: str, book: str, tokenizer, n: int) -> list[int]:
    """The first n tokens of a book (BOS first); fewer is an error."""
    path = Path(folder) / f"{book}.txt"
    if not path.is_file():
        fail(f"{path}: book not found (--books-dir / --train-books-dir and the book ids)")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), bos=tokenizer.bos_id is not None)
    if len(ids) < n:
        fail(f"{path}: {len(ids)} tokens, fewer than the {n} needed")
    return ids[:n]


def label(a: argparse.Namespace) -> str:
    return a.model_label or model_label(a.model)


def check_settings(path: Path, stored: dict, settings: dict) -> None:
    """A result on disk is reused only if it was made with `settings`."""
    differ = sorted(k for k in settings if stored.get(k) != settings[k])
    if differ:
        fail(f"{path} was made with other settings ({', '.join(differ)}): choose another --out or delete it")


def base_settings(a: argparse.Namespace, L: int) -> dict:
    """What every result here depends on."""
    return {"model": str(Path(a.model).resolve()), "stretch": a.stretch, "original": L,
            "dtype": a.dtype, "device": a.device}


# ----------------------------------------------------------------------------- 1. search

def run_search(a: argparse.Namespace, L: int, tokenizer, out: Path) -> dict:
    target = round(L * a.stretch)
    ids = read_book(a.train_books_dir, a.search_book, tokenizer, target)
    model = load_model(a.model, a.device, DTYPES[a.dtype], changes={"max_seq_len": target})
    settings = base_settings(a, L) | {"search_book": a.search_book,
                                      "search_file": str((Path(a.train_books_dir) / f"{a.search_book}.txt").resolve())}
    total = min(dcis.schedule_size(model.args.head_dim // 2, a.offsets, a.min_group), a.max_evals or math.inf)
    say(f"[search] DCIS from {a.init}: up to {total} evaluations, each one forward of {target} tokens "
        f"(book {a.search_book}); log {out / 'dcis-search.json'}")
    try:
        result = dcis.search(model, ids, a.stretch, L, a.init, a.offsets, a.min_group, a.max_evals,
                             out / "dcis-search.json", settings, progress=say)
    except ValueError as e:  # a log made with other settings
        fail(str(e))
    checkpoint = dcis.write_checkpoint(a.model, out / "dcis-checkpoint", result["factors"], a.stretch, L,
                                       result["attention_factor"])
    say(f"[search] {result['evaluations']} evaluations ({'complete' if result['complete'] else 'budget reached'}):"
        f" ppl {result['start_value']:.4f} ({a.init}) -> {result['value']:.4f}; this run {result['wall_s']:.0f} s"
        f" -> {checkpoint}")
    del model
    return {k: result[k] for k in ("factors", "value", "start_value", "evaluations", "complete", "attention_factor",
                                   "init", "start", "settings")} | {"checkpoint": str(checkpoint)}


# ----------------------------------------------------------------------------- 2. perplexity by length

def formulas(args, s: float, L: int) -> dict[str, dict]:
    """How each formula stretches RoPE, as changes to the checkpoint's ModelArgs."""
    return {
        "none": {"rope_scaling": None},
        "PI": {"rope_scaling": {"rope_type": "linear", "factor": s}},
        "NTK": {"rope_theta": dcis.ntk_theta(args.rope_theta, s, args.head_dim)},
        "YaRN": {"rope_scaling": {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L}},
        "Llama 3": {"rope_scaling": {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": L}},
    }


def pooled(entries: dict) -> float:
    return math.exp(sum(e["nll"] for e in entries.values()) / sum(e["tokens"] for e in entries.values()))


def run_ppl(a: argparse.Namespace, L: int, tokenizer, out: Path, search: dict) -> dict:
    target = round(L * a.stretch)
    path = out / "dcis.json"
    settings = base_settings(a, L) | {"eval_books": a.eval_books, "dcis_factors": search["factors"],
                                      "dcis_attention_factor": search["attention_factor"]}
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "methods": {}}
    check_settings(path, results["settings"], settings)
    results |= {"search": search, "command": COMMAND, "model_label": label(a)}
    books = a.eval_books.split(",")
    ids = {b: read_book(a.books_dir, b, tokenizer, max(a.lengths)) for b in books}
    plain = args_from_config(read_json(Path(a.model) / "config.json"))
    ways = {name: (a.model, changes) for name, changes in formulas(plain, a.stretch, L).items()}
    ways["DCIS"] = (search["checkpoint"], {})
    for name, (source, changes) in ways.items():
        results["methods"].setdefault(name, {"changes": changes if source == a.model else f"{source}/config.json",
                                             "ppl": {}})

    def measure(names: list[str], lengths: list[int]) -> None:
        for name in names:
            source, changes = ways[name]
            todo = [(n, b) for n in lengths for b in books if b not in results["methods"][name]["ppl"].get(str(n), {})]
            if not todo:
                continue
            model = load_model(source, a.device, DTYPES[a.dtype], changes=changes | {"max_seq_len": max(lengths)})
            for n, b in todo:
                tic = time.perf_counter()
                nll = dcis.document_nll(model, ids[b][:n])
                entry = {"nll": nll, "tokens": n - 1, "ppl": math.exp(nll / (n - 1)),
                         "seconds": time.perf_counter() - tic}
                results["methods"][name]["ppl"].setdefault(str(n), {})[b] = entry
                dcis.write_json(path, results)
                say(f"[ppl] {name:8s} {n:6d} tokens, book {b}: ppl {entry['ppl']:.3f} ({entry['seconds']:.1f} s)")
            del model

    measure(list(ways), [n for n in a.lengths if n <= target])
    at_target = {name: pooled(m["ppl"][str(target)]) for name, m in results["methods"].items()
                 if len(m["ppl"].get(str(target), {})) == len(books)}
    longer = [n for n in a.lengths if n > target]
    if longer and at_target:
        best = sorted(at_target, key=at_target.get)[: a.long_methods]
        say(f"[ppl] past {target} tokens: the {len(best)} best at {target}: {', '.join(best)}")
        measure(best, longer)
    results["pooled"] = {name: {n: pooled(entries) for n, entries in m["ppl"].items() if len(entries) == len(books)}
                         for name, m in results["methods"].items()}
    dcis.write_json(path, results)
    plot(results, out / "dcis.png", L, target)
    return results


def plot(results: dict, path: Path, L: int, target: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, by_length in results["pooled"].items():
        lengths = sorted(by_length, key=int)
        ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], "o-", label=name)
    ax.axvline(L, color="gray", ls=":", lw=1, label=f"trained length L = {L}")
    ax.axvline(target, color="gray", ls="--", lw=1, label=f"target L·s = {target}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="tokens in the forward (first N of each book)", ylabel="perplexity (pooled over books)")
    books = results["settings"]["eval_books"]
    ax.set_title(f"{results['model_label']}\nheld-out PG19 books {books}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------- 3. Temp-LoRA past the original window

def run_templora(a: argparse.Namespace, L: int, tokenizer, out: Path, search: dict) -> None:
    target = round(L * a.stretch)
    runs = [("dcis-stretched", search["checkpoint"], target), ("dcis-plain", a.model, L)]
    for name, source, window in runs:
        cfg = replace(REPLICATION, delta=a.delta, context=a.context, window=window, keep=window // 2)
        settings = base_settings(a, L) | {"config": asdict(cfg) | {"base_window": window},
                                          "text_tokens": a.templora_tokens + 1}
        if name == "dcis-stretched":
            settings["dcis_factors"] = search["factors"]
        todo = []
        for book in a.templora_books.split(","):
            path = out / f"{name}-w{window}-{book}.json"
            if path.exists():
                check_settings(path, json.loads(path.read_text()), settings)
            else:
                todo.append((book, path))
        if not todo:
            continue
        model = load_model(source, a.device, DTYPES[a.dtype])
        for book, path in todo:
            ids = read_book(a.books_dir, book, tokenizer, a.templora_tokens + 1)
            say(f"[templora] {name}, W={window}, L_x={cfg.keep}, book {book}: {a.templora_tokens} tokens, "
                f"Δ={cfg.delta}")

            def progress(chunks, done, total, elapsed):
                if len(chunks) % 8 == 0 or done == total:
                    say(f"  {done - 1}/{total - 1} tokens, {elapsed:.0f} s")
            with FlopCounter(model) as counter:
                r = evaluate(model, ids, cfg, None, progress, extras=lambda: {"flops": counter.take()})
            r |= settings | {"run": name, "book": book, "command": COMMAND, "model_label": label(a),
                             "checkpoint": str(source), "flops": counter.totals}
            dcis.write_json(path, r)
            say(f"  ppl base {r['ppl_base']:.3f}, Temp-LoRA {r['ppl_templora']:.3f}; "
                f"{r['timings']['total_s']:.0f} s -> {path}")
        del model


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    a = parse_args(argv)
    used = (a.eval_books.split(",") if "ppl" in a.parts else []) + \
        (a.templora_books.split(",") if "templora" in a.parts else [])
    require_model(a.model)  # model and books are checked before the search, not after it
    require_books(a.train_books_dir, "--train-books-dir", [a.search_book])
    if used:
        require_books(a.books_dir, "--books-dir", used)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        config = read_json(Path(a.model) / "config.json")
        tokenizer = load_tokenizer(Path(a.model), config)
        L = a.original or config["max_position_embeddings"]
        search_file = (Path(a.train_books_dir) / f"{a.search_book}.txt").resolve()
        held_out = {(Path(a.books_dir) / f"{b}.txt").resolve() for b in used}
        if search_file in held_out:
            fail(f"--search-book {search_file} is also an evaluation book: the search must not see them")
        say(f"bench.dcis: {label(a)}, L = {L}, s = {a.stretch:g}, target {round(L * a.stretch)} tokens; "
            f"{a.dtype} on {a.device}; parts {','.join(a.parts)} -> {out}")
        search = run_search(a, L, tokenizer, out)  # replays its log if there is one: no evaluation is redone
        if "ppl" in a.parts:
            results = run_ppl(a, L, tokenizer, out, search)
            say(table(results))
            target = str(round(L * a.stretch))
            ours, yarn = (results["pooled"][m].get(target) for m in ("DCIS", "YaRN"))
            if ours and yarn:
                say(f"DCIS vs YaRN at {target} tokens on the held-out books: {ours:.3f} vs {yarn:.3f} "
                    f"({100 * (ours / yarn - 1):+.2f}%)")
        if "templora" in a.parts:
            run_templora(a, L, tokenizer, out, search)
    except (CheckpointError, ValueError, OSError) as e:
        fail(str(e))
    say(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


def table(results: dict) -> str:
    lengths = sorted({int(n) for m in results["pooled"].values() for n in m})
    rows = ["| method | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, by_length in results["pooled"].items():
        rows.append(f"| {name} | " + " | ".join(f"{by_length[str(n)]:.2f}" if str(n) in by_length else "—"
                                                for n in lengths) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
