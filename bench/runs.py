"""Put several result files of `python templora.py eval` side by side: the knobs that differ between the runs,
perplexity overall and by position in the text with the change against the first run, and (--plot) a figure
of perplexity by block. An ablation is run by flags and compared here, e.g. attention-only against all linears:

    python templora.py eval --model M --text BOOK --targets all  --out runs/all.json
    python templora.py eval --model M --text BOOK --targets attn --out runs/attn.json
    python -m bench.runs runs/all.json runs/attn.json --md runs/report.md --plot runs/ppl.png

Runs compare only on the same tokens: the same text and the same number of scored tokens (their blocks may
differ, e.g. Δ halved). Each run's figure is its Temp-LoRA perplexity (its base perplexity for a run with
--no-templora); the base model's is shown once when every run scored it alike.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from protocol import perplexity, position_buckets, write_text_atomic


def load_run(path: str) -> dict:
    try:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{path}: not a JSON result file ({e})") from None
    if not isinstance(r, dict) or not r.get("chunks") or "config" not in r:
        raise ValueError(f"{path}: not a result of `templora.py eval` (no chunks or config)")
    return r


def scorer(r: dict) -> str:
    return "templora" if "nll_templora" in r["chunks"][0] else "base"


def knob_table(names: list[str], runs: list[dict]) -> tuple[list[str], str]:
    """Markdown rows of the knobs that differ, and one line of those the runs share."""
    keys = sorted({k for r in runs for k in r["config"]})
    differ = [k for k in keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1]
    same = ", ".join(f"{k}={runs[0]['config'].get(k)}" for k in keys if k not in differ)
    if not differ:
        return [], same
    rows = ["| run | " + " | ".join(differ) + " |", "|---" * (len(differ) + 1) + "|"]
    rows += [f"| {n} | " + " | ".join(str(r["config"].get(k)) for k in differ) + " |" for n, r in zip(names, runs)]
    return rows, same


def report(names: list[str], runs: list[dict]) -> str:
    first = perplexity(runs[0]["chunks"], scorer(runs[0]))
    base = [perplexity(r["chunks"], "base") for r in runs]
    one_base = max(base) - min(base) <= 1e-6 * min(base)
    rows, same = knob_table(names, runs)
    out = [f"# {len(runs)} runs side by side", "", f"Text: {runs[0].get('text')}, {runs[0]['scored_tokens']} scored "
           f"tokens; model {runs[0].get('model')}, {runs[0].get('dtype')} on {runs[0].get('device')}.", "",
           "## Knobs that differ", ""] + (rows or ["(none)"]) + ["", f"Shared: {same}", "", "## Perplexity", "",
           "| run | scorer | ppl | vs first | " + ("" if one_base else "ppl base | ")
           + "adapter parameters | wall s | complete |", "|---|---|---|---|" + ("" if one_base else "---|") + "---|---|---|"]
    for n, r, b in zip(names, runs, base):
        ppl = perplexity(r["chunks"], scorer(r))
        wall = r.get("timings", {}).get("total_s")
        out.append(f"| {n} | {scorer(r)} | {ppl:.3f} | {100 * (ppl / first - 1):+.2f}% | "
                   + ("" if one_base else f"{b:.3f} | ") + f"{r.get('adapter_parameters', 0):,} | " + (f"{wall:.0f}" if wall is not None else "–") + " | "
                   + ("yes" if r.get("complete") else "**no: incomplete**") + " |")
    if one_base:
        out += ["", f"Base model (adapter off, the same window): ppl {base[0]:.3f}."]
    out += ["", "## By position in the text", "", "| position | tokens | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|"]
    for lo, hi, label in position_buckets():
        inside = [[c for c in r["chunks"] if lo <= c["start"] < hi] for r in runs]
        if not inside[0]:
            continue
        ppl = [perplexity(c, scorer(r)) for c, r in zip(inside, runs)]
        cells = [f"{ppl[0]:.3f}"] + [f"{p:.3f} ({100 * (p / ppl[0] - 1):+.2f}%)" for p in ppl[1:]]
        out.append(f"| {label} | {sum(c['tokens'] for c in inside[0])} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(names: list[str], runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, r in zip(names, runs):
        ax.plot([c["start"] for c in r["chunks"]], [perplexity([c], scorer(r)) for c in r["chunks"]], ".-", label=n)
    ax.plot([c["start"] for c in runs[0]["chunks"]], [perplexity([c], "base") for c in runs[0]["chunks"]], "k--",
            label="base model")
    ax.set(xlabel="first token of the block", ylabel="perplexity of the block", title="Perplexity by block")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="result files of `templora.py eval`")
    p.add_argument("--names", help="comma-separated names of the runs (default: the file names' stems)")
    p.add_argument("--md", help="also write the report to this Markdown file")
    p.add_argument("--plot", help="write a PNG of perplexity by block here")
    a = p.parse_args(argv)
    try:
        runs = [load_run(f) for f in a.runs]
        names = a.names.split(",") if a.names else [Path(f).stem for f in a.runs]
        if len(names) != len(runs):
            raise ValueError(f"--names: {len(names)} names for {len(runs)} runs")
        for f, r in zip(a.runs, runs):
            if (r.get("text"), r["scored_tokens"]) != (runs[0].get("text"), runs[0]["scored_tokens"]):
                raise ValueError(f"{f}: scored {r['scored_tokens']} tokens of {r.get('text')}, not the "
                                 f"{runs[0]['scored_tokens']} tokens of {runs[0].get('text')} that {a.runs[0]} "
                                 "scored: side by side means the same tokens")
            if not all(math.isfinite(c.get(f"nll_{scorer(r)}", math.nan)) for c in r["chunks"]):
                raise ValueError(f"{f}: a block has no finite NLL")
        text = report(names, runs)
        if a.md:
            write_text_atomic(a.md, text)
        if a.plot:
            plot(names, runs, a.plot)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
