"""One table and one plot for every long-context method, scored by the same block protocol on the same books.

    python -m bench.compare          # reads bench/results, writes bench/results/compare.md and compare.png

Each row reads result JSONs that a benchmark already wrote (protocol.evaluate_blocks's shape: `chunks` with
`nll_<scorer>`, and `timings`) and takes one scorer from them. The table's rows cover the same books and the
same scored tokens as its first row: perplexities of different texts do not compare. A run on part of that
text (fewer books, or the first tokens of each: a CPU-sized run) is shown in a second table, next to the first
row scored on exactly that part; a row with text outside it is refused. A method joins the table with one
`Row` below; a row whose results do not exist yet is listed under the table with
the command that makes them, never silently dropped.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

from bench.common import RESULTS
from protocol import perplexity, position_buckets, write_text_atomic

BUCKETS = position_buckets((0, 4096, 8192, 16384, 32768))


class Row(NamedTuple):
    label: str
    files: str                 # glob of result JSONs in the results folder, one per book
    scorer: str                # which nll_<scorer> of those results
    flop_phases: tuple = ()    # phases of the blocks' "flops" that are this method's cost (empty: not counted)
    time_keys: tuple = ()      # keys of "timings" that are this method's wall time
    memory_run: str | None = None  # run in memory.json (peak RSS of a fresh process, book 349) if measured
    command: str = "python -m bench.replicate"  # what writes the results
    passkey: str | None = None  # the method of bench/passkey.py that is this row's method in its natural form


SUPRA_COMMAND = ("python -m bench.supra --device cuda --model DIR --books-dir DIR --train-books-dir DIR "
                 "--out bench/results")
UIO = "python -m bench.uio --model DIR --books-dir DIR --train-books-dir DIR --device cuda --out bench/results"
UIO_COST = dict(flop_phases=("decode", "encode"), time_keys=("decode_s", "encode_s"), command=UIO)
UIO_CPU = ("python -m bench.uio --model DIR --books-dir DIR --train-books-dir DIR --book-ids 349,718 --tokens 16384 "
           "--train-variants= --scaling-tokens= --scaling-segments= --dtype float32 --out bench/results/uio-cpu/fixed")
UIO_CPU_COST = UIO_COST | {"command": UIO_CPU}
BPT_COMMAND = "python -m bench.bpt books --device cuda --model DIR --books-dir DIR --out bench/results"
BPT_CPU_COMMAND = ("python -m bench.bpt books --model DIR --books-dir DIR --book-ids 349,718 --tokens 8192 "
                   "--out bench/results/bpt/books-cpu")
DCIS_COMMAND = "python -m bench.dcis --device cuda --out bench/results/dcis"
LOLCATS_CPU = "python -m bench.lolcats --model DIR --books-dir DIR --train-books-dir DIR --out bench/results/lolcats-cpu"
LOLCATS_CPU_8K = ("python -m bench.lolcats --model DIR --books-dir DIR --train-books-dir DIR --seq-len 8192 "
                  "--transfer-steps 36 --lora-steps 0 --out bench/results/lolcats-cpu-len8192")

ROWS = [
    Row("base, W=2K", "main-*.json", "base", ("score_base",), ("score_base_s",), passkey="base-short"),
    Row("base, W=8K (full context)", "base-w8192-*.json", "base", ("score_base",), ("score_base_s",), "base_32768",
        passkey="base-long"),
    Row("Temp-LoRA, W=2K", "main-*.json", "templora", ("score_templora", "train"), ("score_templora_s", "train_s"),
        "templora_32768", passkey="templora"),
    # bench/supra.py (one GPU run): its own base W=2K reference, and two linearised models with no window
    Row("base, W=2K (bench.supra run)", "supra-base-w2048-*.json", "base", (), ("score_base_s",),
        command=SUPRA_COMMAND),
    Row("SUPRA linearised, no window", "supra-supra-[0-9]*.json", "supra", (), ("total_s",), command=SUPRA_COMMAND,
        passkey="supra"),
    Row("SUPRA arch., LoLCATs-style transfer (uncalibrated; run as lolcats)", "supra-lolcats-*.json", "lolcats", (),
        ("total_s",), command=SUPRA_COMMAND),
    # bench/lolcats.py (CPU run, books 349 and 718, first 8K tokens): LoLCATs itself, Hedgehog + 64-token window
    Row("base, W=2K (bench.lolcats CPU run)", "lolcats-cpu/lolcats-base-w2048-*.json", "base", (), ("score_base_s",),
        command=LOLCATS_CPU),
    Row("LoLCATs after attention transfer (CPU run)", "lolcats-cpu/lolcats-transfer-*.json", "transfer", (),
        ("total_s",), command=LOLCATS_CPU),
    Row("LoLCATs, transfer then LoRA (CPU run)", "lolcats-cpu/lolcats-lolcats-*.json", "lolcats", (), ("total_s",),
        command=LOLCATS_CPU, passkey="lolcats"),
    Row("LoLCATs after attention transfer at 8K tokens a sequence (CPU run)",
        "lolcats-cpu-len8192/lolcats-transfer-*.json", "transfer", (), ("total_s",), command=LOLCATS_CPU_8K),
    # UIO-LLMs (bench/uio.py): segments of 1024 = the blocks, 32 memory tokens each; its own base W=2K reference
    Row("base, W=2K (UIO's run)", "uio-base-w2048-*.json", "base", ("score_base",), ("score_base_s",), command=UIO),
    Row("UIO, no memory (segment-local)", "uio-nomemory-*.json", "uio", **UIO_COST),
    Row("UIO, untrained memory (the paper's form)", "uio-untrained-*.json", "uio", **UIO_COST),
    Row("UIO, trained with recent-only BPTT", "uio-recent-*.json", "uio", **UIO_COST),
    Row("UIO, trained with reservoir BPTT (unbiased)", "uio-reservoir-*.json", "uio", **UIO_COST),
    Row("UIO, trained with full BPTT", "uio-full-*.json", "uio", **UIO_COST),
    # the same on the CPU (books 349 and 718, first 16K tokens), the fixed form: a sink, no layer-0 memory
    Row("base, W=2K (UIO's CPU run)", "uio-cpu/fixed/uio-base-w2048-*.json", "base", ("score_base",),
        ("score_base_s",), command=UIO_CPU),
    Row("UIO, no memory (CPU run)", "uio-cpu/fixed/uio-nomemory-*.json", "uio", **UIO_CPU_COST),
    Row("UIO, untrained memory, sink + no layer-0 memory (CPU run)", "uio-cpu/fixed/uio-untrained-*.json", "uio",
        **UIO_CPU_COST, passkey="uio"),
    # bench/bpt.py books: Temp-LoRA at the replication's L_T, and at a long L_T computed blockwise; the full run
    # (four books, a GPU) and the CPU-sized one (two books, their first 8K tokens: the second table)
    Row("Temp-LoRA, W=2K, L_T=512 (bench.bpt run)", "bpt-LT512-*.json", "templora", (),
        ("score_templora_s", "train_s"), command=BPT_COMMAND),
    Row("Temp-LoRA, W=2K, L_T=4K (blockwise)", "bpt-LT4096-*.json", "templora", (), ("score_templora_s", "train_s"),
        command=BPT_COMMAND, passkey="bpt"),
    Row("base, W=2K (bench.bpt CPU run)", "bpt/books-cpu/bpt-LT512-*.json", "base", (), ("score_base_s",),
        command=BPT_CPU_COMMAND),
    Row("Temp-LoRA, W=2K, L_T=512 (bench.bpt CPU run)", "bpt/books-cpu/bpt-LT512-*.json", "templora", (),
        ("score_templora_s", "train_s"), command=BPT_CPU_COMMAND),
    Row("Temp-LoRA, W=2K, L_T=4K (blockwise, CPU run)", "bpt/books-cpu/bpt-LT4096-*.json", "templora", (),
        ("score_templora_s", "train_s"), command=BPT_CPU_COMMAND),
    # bench/dcis.py: the window stretched past SmolLM2's trained 8K by DCIS's searched RoPE factors
    Row("Temp-LoRA, W=8K", "dcis/dcis-plain-w8192-*.json", "templora", ("score_templora", "train"),
        ("score_templora_s", "train_s"), command=DCIS_COMMAND),
    Row("base, W=16K (DCIS-stretched)", "dcis/dcis-stretched-w16384-*.json", "base", ("score_base",), ("score_base_s",),
        command=DCIS_COMMAND, passkey="dcis"),
    Row("Temp-LoRA, W=16K (DCIS-stretched)", "dcis/dcis-stretched-w16384-*.json", "templora", ("score_templora", "train"),
        ("score_templora_s", "train_s"), command=DCIS_COMMAND),
]


def load_row(row: Row, folder: Path) -> list[dict]:
    files = sorted(folder.glob(row.files))
    results = [json.loads(f.read_text()) for f in files]
    for f, r in zip(files, results):
        if f"nll_{row.scorer}" not in r["chunks"][0]:
            raise ValueError(f"{f}: has no nll_{row.scorer} (row {row.label!r})")
    return results


def book_of(r: dict) -> str:
    return Path(r.get("book") or r["text"]).stem


def load_passkeys(folder: Path) -> dict[str, dict]:
    """bench/passkey.py's results in `folder`, pooled per method: {method: {accuracy, exact, n, chance, ...}}."""
    from bench import passkey
    results = passkey.load_results(folder) if folder.is_dir() else []
    methods = {r["method"] for r in results}
    return {m: passkey.summary([r for r in results if r["method"] == m]) for m in methods}


def retrieval_cell(r: dict) -> str:
    p = r.get("passkey")
    return f"{p['accuracy']:.2f} ({p['exact']}/{p['n']})" if p else "—"


def summarise(row: Row, results: list[dict], memory: dict, passkeys: dict | None = None) -> dict:
    chunks = [c for r in results for c in r["chunks"]]
    by_position = {}
    for lo, hi, name in BUCKETS:
        inside = [c for c in chunks if lo <= c["start"] < hi]
        if inside:
            by_position[name] = perplexity(inside, row.scorer)
    counted = row.flop_phases and all("flops" in c for c in chunks)
    run = memory.get("runs", {}).get(row.memory_run) if row.memory_run else None
    return {"label": row.label, "by_position": by_position, "all": perplexity(chunks, row.scorer),
            "flops": sum(c["flops"][p] for c in chunks for p in row.flop_phases) if counted else None,
            "wall_s": sum(r["timings"][k] for r in results for k in row.time_keys) if row.time_keys else None,
            "peak_rss_mib": run["peak_rss_mib"] if run else None,
            "passkey": (passkeys or {}).get(row.passkey),
            "books": sorted(book_of(r) for r in results), "tokens": sorted({r["scored_tokens"] for r in results}),
            "commands": sorted({r.get("command", "templora.py eval") for r in results}),
            "run_on": ", ".join(sorted({f"{r.get('dtype', '?')} on {r.get('device', '?')}" for r in results}))}


def markdown(rows: list[dict]) -> str:
    names = [n for _, _, n in BUCKETS if any(n in r["by_position"] for r in rows)]
    ref = rows[0]["all"]
    out = ["| method | " + " | ".join(names) + " | all | vs " + rows[0]["label"] + " | FLOPs | wall s | peak RSS MiB | key acc "
           "| run on |", "|---" * (len(names) + 8) + "|"]
    for r in rows:
        cells = [f"{r['by_position'][n]:.2f}" if n in r["by_position"] else "" for n in names]
        flops = f"{r['flops']:.3g}" if r["flops"] is not None else "—"
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—"
        peak = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] is not None else "—"
        out.append(f"| {r['label']} | " + " | ".join(cells) + f" | **{r['all']:.2f}** | "
                   f"{100 * (r['all'] / ref - 1):+.1f}% | {flops} | {wall} | {peak} | {retrieval_cell(r)} | {r['run_on']} |")
    first = rows[0]
    out += ["", f"Perplexity = exp(mean NLL) by position of the block in the book, pooled over books "
            f"{', '.join(first['books'])} ({first['tokens'][0]} scored tokens each). FLOPs and wall time: the "
            "method's own work summed over those books (bench/flops.py; wall time on the machine that ran it). "
            "Peak RSS: bench/results/memory.json (a fresh process per run, book 349, 32K tokens); — where not "
            "measured. Key acc: passkey retrieval of the same method in its natural form (bench/passkey.py, "
            "bench/results/passkey): the share of probes whose true key has the highest log-likelihood among K+1 "
            "candidates (chance 1/(K+1)), pooled over its grid of lengths x depths x keys, and (in brackets) greedy "
            "exact matches / probes; — where not run. The probe's haystacks are 512-2048 tokens with windows "
            "scaled to them (W = length/2 for the base model with a short window, Temp-LoRA and BPT; the whole "
            "text for the base model with a long window and for DCIS), so the column is the method's memory of a "
            "fact outside (or inside) its window, not a score at the row's window; see docs/passkey.md. "
            "Produced by: " + "; ".join(
                f"`{c}`" for c in sorted({c for r in rows for c in r["commands"]}))]
    return "\n".join(out) + "\n"


def first_part(results: list[dict], part: dict, first: dict) -> list[dict]:
    """The first row's results cut to the books and leading tokens that a run on part of the text covered."""
    if not (set(part["books"]) <= set(first["books"]) and len(part["tokens"]) == 1
            and part["tokens"][0] <= first["tokens"][0]):
        raise ValueError(f"{part['label']!r} covers books {part['books']} x {part['tokens']} tokens, which is not "
                         f"part of {first['label']!r}'s {first['books']} x {first['tokens']}")
    n, cut = part["tokens"][0], []
    for r in (r for r in results if book_of(r) in part["books"]):
        chunks = [c for c in r["chunks"] if c["start"] <= n]  # scored tokens are ids[1:], so block k starts at 1 + kΔ
        if sum(c["tokens"] for c in chunks) != n:
            raise ValueError(f"{part['label']!r}: its first {n} tokens do not end on a block of "
                             f"{first['label']!r} (another Δ?)")
        cut.append(r | {"chunks": chunks, "scored_tokens": n})
    return cut


def part_markdown(parts: list[tuple[dict, dict]]) -> str:
    out = ["", "Runs on part of the text (a CPU-sized run), each next to the first row scored on the same part:", "",
           "| method | books | scored tokens each | ppl | the first row, same text | change | wall s | key acc | run on |",
           "|---" * 9 + "|"]
    for r, ref in parts:
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—"
        out.append(f"| {r['label']} | {', '.join(r['books'])} | {r['tokens'][0]} | **{r['all']:.2f}** | "
                   f"{ref['all']:.2f} ({ref['label']}) | {100 * (r['all'] / ref['all'] - 1):+.1f}% | {wall} | "
                   f"{retrieval_cell(r)} | {r['run_on']} |")
    commands = sorted({c for r, _ in parts for c in r["commands"]})
    return "\n".join(out) + "\n\nProduced by: " + "; ".join(f"`{c}`" for c in commands) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        ax.plot(list(r["by_position"]), list(r["by_position"].values()), "o-", label=r["label"])
    ax.set_yscale("log")  # methods far off (an undertrained linearised model) would flatten the rest
    ax.set(xlabel="position of the block in the book (tokens)", ylabel="perplexity (exp mean NLL, log scale)")
    ax.set_title(f"Same books, same blocks: {', '.join(rows[0]['books'])}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder of result JSONs (and memory.json)")
    p.add_argument("--out", default=None, help="folder for compare.md and compare.png (default: --results)")
    a = p.parse_args(argv)
    folder, out = Path(a.results), Path(a.out or a.results)
    try:
        memory_file = folder / "memory.json"
        memory = json.loads(memory_file.read_text()) if memory_file.exists() else {}
        loaded = [(row, load_row(row, folder)) for row in ROWS]
        missing = [row for row, results in loaded if not results]
        loaded = [(row, results) for row, results in loaded if results]
        if not loaded:
            raise ValueError(f"no results in {folder} for any row")
        passkeys = load_passkeys(folder / "passkey")
        rows, parts = [summarise(*loaded[0], memory, passkeys)], []
        for row, results in loaded[1:]:
            r = summarise(row, results, memory, passkeys)
            if (r["books"], r["tokens"]) == (rows[0]["books"], rows[0]["tokens"]):
                rows.append(r)
            else:  # a part of the first row's text, or refused
                parts.append((r, summarise(loaded[0][0], first_part(loaded[0][1], r, rows[0]), memory)))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(rows) + (part_markdown(parts) if parts else "")
    if missing:
        table += "\nNot run yet (no results in the folder):\n" + "".join(
            f"- {row.label}: `{row.command}` writes {row.files}\n" for row in missing)
    write_text_atomic(out / "compare.md", table)
    plot(rows, out / "compare.png")
    print(table + f"\n-> {out / 'compare.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
