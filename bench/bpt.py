"""BPT (methods/bpt.py) in Temp-LoRA's adapter step: peak memory and time against the training length, and
what a long L_T buys on the books.

    python -m bench.bpt table --model DIR --device cuda --out DIR                     # ~4 min on an H100
    python -m bench.bpt books --model DIR --books-dir DIR --device cuda --out DIR     # ~3-4 min on an H100
    python -m bench.bpt table --model DIR --models smollm2 --lengths 1024,2048,4096,8192 --no-warmup \
        --point-timeout-s 900 --out DIR                                               # 27 min on a 2-core CPU
    python -m bench.bpt table --quick --model CKPT --out DIR                          # seconds on a CPU
    python -m bench.bpt books --quick --model CKPT --books-dir DIR --book-ids ID --out DIR

table: one adapter step (train_block with epochs=1: forward, backward, clip, AdamW; the replication's LoRA,
rank 64 on every linear, dropout 0.05) on T = L_T + Δ tokens (Δ = 1024 fixed, L_T varied; random token ids:
memory and time do not depend on them), for each variant below, on SmolLM2 (--model, real weights) and on
Llama-3.2-1B's shapes (random weights, built in place). Every point runs in a fresh child process. On CUDA
its peak is torch.cuda.max_memory_allocated, and the budget is enforced (set_per_process_memory_fraction):
a point that needs more ends in OOM, recorded as such. On a CPU the child's ru_maxrss is recorded (the whole
process: weights, Python and torch too, where a GPU's figure is torch's tensors alone; glibc told to return
freed blocks, CPU_MALLOC below) and the parent enforces
the budget: it watches the child's resident memory and kills it past the budget, an OOM. Memory grows with T,
so after an OOM the longer points of that variant are recorded as OOM without running. The time is that of
the second of two steps (the first warms up kernels and allocator); --no-warmup runs one step and times it
as it is (for a CPU, where a 16K step takes minutes).

    vanilla      today's step with the T x T attention materialised (SDPA's math kernel): the paper's "vanilla"
    today        train_block.block_loss as Temp-LoRA runs it (fused flash attention on a GPU), nothing recomputed
    checkpoint   per-layer checkpointing only: the model's own layers, each recomputed in backward
    loss         blockwise loss only: head + cross-entropy in blocks, each recomputed; layers as today
    bpt          methods/bpt.py: blockwise attention, feed-forward and loss, each block recomputed

With --llama1b-layers N < 16, the 1B shapes run at N and N/2 layers and are extrapolated linearly to 16:
the layers are identical, so peak = (embedding, head, loss, optimizer of nothing) + layers x (one layer's
weights, adapter, kept activations), and the step time likewise.

books: templora.evaluate with the replication's knobs (bench/common.py REPLICATION: Δ=1024, W=2048,
L_x=1024, rank 64, lr 3e-4, 2 steps per block) at L_T = 512 and at a long L_T (4096) computed blockwise, on
books 349, 718, 1684, 2021, the first 32768 scored tokens each: one JSON per (variant, book) in the
protocol's shape, with the peak memory, for bench/compare.py.

Both modes write each result atomically as it completes, skip what is already written (a result made with
other settings is an error, not overwritten, unless --force), and stop starting work past --time-budget-s.
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import (EVAL_BOOKS, LLAMA_1B, REPLICATION, REPO, model_label, require_books, require_model,
                          with_default_knobs)
from cli import DTYPES
from load_llama import args_from_config, load_llama, load_model
from lora import add_lora, lora_parameters
from methods import bpt
from model import Transformer
from protocol import perplexity, write_json
from templora import TempLoRAConfig, config_record, evaluate
from train_block import block_loss, make_optimizer, train_block

VARIANTS = ("vanilla", "today", "checkpoint", "loss", "bpt")
RUN_ORDER = ("bpt", "checkpoint", "loss", "today", "vanilla")  # on both models, BPT first: the budget may run out
MODELS = ("smollm2", "llama1b")
LENGTHS = "1024,2048,4096,8192,16384,32768"
BOOK_IDS = "349,718,1684,2021"
FULL_1B_LAYERS = LLAMA_1B["num_hidden_layers"]
# --quick: tiny sizes that run end to end in seconds on a CPU (the 1B shapes shrunk, a 256-position checkpoint)
QUICK_1B = LLAMA_1B | dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=512, num_hidden_layers=2)
QUICK_TABLE = dict(lengths="64,128", delta=32, q_block=32, kv_block=32, loss_block=16, rank=4, llama1b_layers=2)
QUICK_BOOKS = dict(tokens=128, short_context=16, long_context=64, blockwise=16)
QUICK_KNOBS = dict(delta=32, window=96, keep=32, rank=4)


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- one point, in a child process

def random_model(config: dict, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A frozen model of config.json's shapes with random weights, made in `dtype` on `device` directly."""
    args = args_from_config(config, "the Llama-3.2-1B shapes")
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=g)
    return model.requires_grad_(False).eval()


def step_loss(spec: dict):
    """The loss function of one variant and the attention kernels it may use."""
    blocks = dict(q_block=spec["q_block"], kv_block=spec["kv_block"], loss_block=spec["loss_block"])
    return {"vanilla": (block_loss, [SDPBackend.MATH]),
            "today": (block_loss, None),
            "checkpoint": (partial(bpt.block_loss, layers="checkpointed", loss="full"), None),
            "loss": (partial(bpt.block_loss, layers="plain", loss="blockwise", **blocks), None),
            "bpt": (partial(bpt.block_loss, **blocks), None)}[spec["variant"]]


def run_point(spec: dict) -> dict:
    """Two adapter steps of one variant on spec["length"] tokens; the peak memory and the second step's time."""
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["budget_gib"] * 2**30 / total), device)

    def memory_gib() -> tuple[float, float]:  # (now, peak so far)
        if cuda:
            return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return rss, rss

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    model = (load_model(spec["path"], device, dtype) if spec["path"] else random_model(spec["config"], device, dtype))
    cfg = REPLICATION
    add_lora(model, spec["rank"], spec["rank"], cfg.dropout, generator=torch.Generator(device).manual_seed(0))
    optimizer = make_optimizer(lora_parameters(model), cfg.lr)
    T, delta = spec["length"], spec["delta"]
    ids = torch.randint(0, model.args.vocab_size, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    loss_fn, kernels = step_loss(spec)
    setup_gib = memory_gib()[0]  # weights + adapter, before the step (AdamW's moments appear in the first)
    times, losses = [], []
    try:
        for _ in range(2 if spec["warmup"] else 1):
            sync()
            tic = time.perf_counter()
            with sdpa_kernel(kernels) if kernels else nullcontext():
                losses += train_block(model, optimizer, ids[: T - delta], ids[T - delta:], cfg.lr, epochs=1,
                                      loss_fn=loss_fn)
            sync()
            times.append(time.perf_counter() - tic)
    except torch.OutOfMemoryError:
        return {"status": "OOM", "setup_gib": setup_gib, "peak_before_oom_gib": memory_gib()[1]}
    return {"status": "ok", "peak_gib": memory_gib()[1], "setup_gib": setup_gib, "step_s": times[-1],
            "first_step_s": times[0], "losses": losses,
            "memory": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss (whole process)"}


# glibc keeps freed memory of a size it has seen mmap'd and freed (its threshold rises to it) in the heap, where it
# stays resident: measured, one BPT step at T=4096 peaked at 3.64 GiB of RSS against 1.33 GiB with this setting,
# and per-layer checkpointing peaked higher at T=8192 (7.38 GiB) than at 16384 (3.60 GiB). A fixed threshold
# returns every large block to the system when it is freed, so a CPU's peak RSS follows the tensors alive (at
# some cost in time: page faults on every new block).
CPU_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_gib(pid: int) -> float:
    """A process's resident memory now (0 once it has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(x.split()[1]) / 2**20 for x in status.splitlines() if x.startswith("VmRSS:")), 0.0)  # kB


def child(spec: dict, timeout_s: float) -> dict:
    """run_point(spec) in a fresh interpreter: a peak is a high-water mark, so one point per process.

    On a CPU nothing stops a process at the budget, so this does: it watches the child's resident memory and
    kills it once it passes spec["budget_gib"] (the CPU's OOM); a spike between two looks shows up in the
    child's own ru_maxrss, and a finished point whose peak passed the budget is an OOM too."""
    cmd = [sys.executable, "-m", "bench.bpt", "point", json.dumps(spec)]
    watch = spec["device"] == "cpu"
    tic = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True,
                                env=os.environ | CPU_MALLOC if watch else None)
        while proc.poll() is None:
            if time.perf_counter() - tic > timeout_s:
                proc.kill()
                proc.wait()
                return {"status": "timeout", "wall_s": timeout_s}
            rss = rss_gib(proc.pid) if watch else 0.0
            if rss > spec["budget_gib"]:
                proc.kill()
                proc.wait()
                return {"status": "OOM", "killed_at_rss_gib": rss, "wall_s": time.perf_counter() - tic}
            time.sleep(0.02)
        output.seek(0)
        text = output.read()
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:  # e.g. killed by the kernel for memory
        return {"status": "failed", "returncode": proc.returncode, "output_tail": text.strip().splitlines()[-5:]}
    result = json.loads(lines[-1][len("RESULT "):]) | {"wall_s": time.perf_counter() - tic}
    if watch and result["status"] == "ok" and result["peak_gib"] > spec["budget_gib"]:
        result["status"] = "OOM"  # measured, but past the budget
    return result


# ----------------------------------------------------------------------------- the table

def table_models(a: argparse.Namespace) -> dict[str, dict]:
    """name -> what a child needs to build it: a checkpoint path, or config.json shapes (random weights)."""
    models = {}
    if "smollm2" in a.models:
        models["smollm2"] = {"path": str(a.model), "config": None, "label": model_label(a.model)}
    if "llama1b" in a.models:
        shapes = QUICK_1B if a.quick else LLAMA_1B
        for n in dict.fromkeys([a.llama1b_layers, max(1, a.llama1b_layers // 2)] if a.llama1b_layers < FULL_1B_LAYERS
                               else [a.llama1b_layers]):
            models[f"llama-3.2-1b-{n}L"] = {
                "path": None, "config": shapes | {"num_hidden_layers": n},
                "label": f"Llama-3.2-1B shapes{' (shrunk: --quick)' if a.quick else ''}, random weights, {n} layers"}
    return models


def extrapolate(points: dict, small: str, large: str, variant: str, T: int, n_small: int, n_large: int) -> dict:
    """The 16-layer point from two measured layer counts: each layer adds the same memory and time."""
    p, q = points.get(f"{large}|{variant}|{T}"), points.get(f"{small}|{variant}|{T}")
    if not p or not q:
        return {"status": "not run"}
    if p["status"] != "ok" or q["status"] != "ok":
        return {"status": p["status"] if p["status"] != "ok" else q["status"]}
    scale = (FULL_1B_LAYERS - n_large) / (n_large - n_small)
    return {"status": "ok", "extrapolated": True,
            **{k: p[k] + scale * (p[k] - q[k]) for k in ("peak_gib", "step_s", "setup_gib")}}


def summarise(a: argparse.Namespace, points: dict, models: dict) -> dict:
    """Per model: each variant's longest T within the budget, BPT's ratios to the others, recomputation cost."""
    lengths, rows = a.lengths, {}
    names, labels = list(models), {name: m["label"] for name, m in models.items()}
    if "llama1b" in a.models and a.llama1b_layers < FULL_1B_LAYERS:  # 16 layers, from the two measured counts
        large, small = names[-2], names[-1]
        n_large, n_small = (models[n]["config"]["num_hidden_layers"] for n in (large, small))
        full = f"llama-3.2-1b-{FULL_1B_LAYERS}L"
        points = points | {f"{full}|{v}|{T}": extrapolate(points, small, large, v, T, n_small, n_large)
                           for v in a.variants for T in lengths}
        names.append(full)
        labels[full] = (f"Llama-3.2-1B shapes, {FULL_1B_LAYERS} layers: extrapolated from {n_large} and {n_small}")
    for name in names:
        get = lambda v, T: points.get(f"{name}|{v}|{T}", {"status": "not run"})  # noqa: E731
        fits = {v: [T for T in lengths if get(v, T)["status"] == "ok" and get(v, T)["peak_gib"] <= a.budget_gib]
                for v in a.variants}
        longest = {v: max(ts) if ts else None for v, ts in fits.items()}
        # exact: some length was run and did not fit; otherwise the limit lies beyond what was measured
        exact = {v: any(get(v, T)["status"] == "OOM" or (get(v, T)["status"] == "ok" and T not in fits[v])
                        for T in lengths) for v in a.variants}
        ratios = {}  # BPT's longest length against each other variant's, where both are known well enough
        for v in (v for v in a.variants if v != "bpt" and longest.get("bpt")):
            if longest[v] and exact[v]:
                ratios[f"bpt/{v}"] = {"ratio": longest["bpt"] / longest[v], "at_least": not exact["bpt"]}
            elif exact[v]:
                ratios[f"bpt/{v}"] = {"ratio": None, "why": f"{v} fits no length"}
            else:
                ran = any(get(v, T)["status"] != "not run" for T in lengths)
                ratios[f"bpt/{v}"] = {"ratio": None, "why": f"{v} {'not measured up to its limit' if ran else 'not run'}"}
        cost = {}
        for v in ("checkpoint", "loss", "bpt"):
            common = [T for T in lengths if get(v, T)["status"] == get("today", T)["status"] == "ok"]
            if v in a.variants and "today" in a.variants and common:
                cost[v] = {"length": common[-1], "step_s_ratio_to_today": get(v, common[-1])["step_s"]
                           / get("today", common[-1])["step_s"]}
        rows[name] = {"label": labels[name], "longest_in_budget": longest, "limit_found": exact,
                      "bpt_ratios": ratios, "recompute_time_cost": cost,
                      "points": {v: {T: get(v, T) for T in lengths} for v in a.variants}}
    return rows


def cell(p: dict) -> str:
    if p["status"] == "ok":
        return f"{p['peak_gib']:.2f} GiB, {p['step_s']:.2f} s" + (" (extrap.)" if p.get("extrapolated") else "")
    return p["status"] + (" (not run)" if p.get("skipped") else "")


def limit_text(longest: int | None, exact: bool, points) -> str:
    """A variant's "longest in budget" cell: N (a longer length did not fit), ≥ N, none, or why unknown."""
    if longest:
        return str(longest) if exact else f"≥ {longest}"
    if exact:
        return "none"  # even the shortest length did not fit
    failed = [p["status"] for p in points if p["status"] not in ("ok", "not run")]
    return f"unknown ({failed[0]})" if failed else "not run"


def markdown(a: argparse.Namespace, summary: dict) -> str:
    out = [f"# BPT in the adapter step: peak memory and time of one step against T = L_T + Δ (Δ = {a.delta})", "",
           f"Budget {a.budget_gib:g} GiB; {a.dtype} on {a.device}; LoRA rank {a.rank} on every linear; B_q={a.q_block}, "
           f"B_kv={a.kv_block} (reading form only), loss block {a.loss_block}. Each cell: peak memory, time of one step.", ""]
    for name, s in summary.items():
        out += [f"## {s['label']}", "",
                "| variant | " + " | ".join(f"T={T}" for T in a.lengths) + " | longest in budget |",
                "|---" * (len(a.lengths) + 2) + "|"]
        for v in a.variants:
            limit = limit_text(s["longest_in_budget"][v], s["limit_found"][v], s["points"][v].values())
            out.append(f"| {v} | " + " | ".join(cell(s["points"][v][T]) for T in a.lengths) + f" | {limit} |")
        bpt_longest = s["longest_in_budget"].get("bpt")
        ratios = ", ".join(f"{k}: {'≥ ' if r['at_least'] else ''}{r['ratio']:g}x" if r["ratio"] else
                           f"{k}: {r['why']}, BPT fits {'' if s['limit_found']['bpt'] else '≥ '}{bpt_longest}"
                           for k, r in s["bpt_ratios"].items())
        cost = ", ".join(f"{v} {c['step_s_ratio_to_today']:.2f}x at T={c['length']}"
                         for v, c in s["recompute_time_cost"].items())
        out += ["", f"- Longest T within {a.budget_gib:g} GiB, BPT against each variant: {ratios or 'n/a'} "
                "(paper: 32x vanilla, 2-4x memory-efficient attention).",
                f"- Step time against today's step (the cost of recomputation): {cost or 'n/a'}.", ""]
    return "\n".join(out)


def plot(a: argparse.Namespace, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], summary.items()):
        for v in a.variants:
            ok = [(T, p["peak_gib"]) for T, p in s["points"][v].items() if p["status"] == "ok"]
            line, = ax.plot([T for T, _ in ok], [g for _, g in ok], "o-", label=v)
            oom = [T for T, p in s["points"][v].items() if p["status"] == "OOM"][:1]
            ax.plot(oom, [a.budget_gib] * len(oom), "x", color=line.get_color(), markersize=10)
        ax.axhline(a.budget_gib, color="gray", ls="--", lw=1, label=f"budget {a.budget_gib:g} GiB (x: OOM)")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="training length T = L_T + Δ (tokens)", ylabel="peak memory (GiB)")
        ax.set_title(s["label"], fontsize=8)
        ax.set_xticks(a.lengths, [f"{T // 1024}K" if T >= 1024 else str(T) for T in a.lengths])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_main(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path, models = out / "bpt-table.json", table_models(a)
    settings = {k: getattr(a, k) for k in ("lengths", "delta", "device", "dtype", "budget_gib", "q_block", "kv_block",
                                          "loss_block", "rank", "quick", "warmup")}
    settings["model"] = str(Path(a.model).resolve())
    stored = json.loads(path.read_text()) if path.exists() and not a.force else {}
    if stored:
        stored["settings"].setdefault("warmup", True)  # results from before --no-warmup existed
    if stored and stored["settings"] != settings:
        differ = [k for k in settings if stored["settings"].get(k) != settings[k]]
        raise ValueError(f"{path} was made with other settings ({', '.join(differ)}); rerun with --force or another --out")
    points, t0 = stored.get("points", {}), time.perf_counter()
    log(f"{len(models) * len(a.variants) * len(a.lengths)} points, {len(points)} already in {path}")
    for v in sorted(a.variants, key=RUN_ORDER.index):
        for name, model in models.items():
            stop = None  # the first length that ran out of memory (or time): longer ones would too
            for T in a.lengths:
                key = f"{name}|{v}|{T}"
                if key not in points:
                    if stop:
                        points[key] = {"status": stop[0], "skipped": f"{stop[0]} at T={stop[1]}"}
                    elif time.perf_counter() - t0 > a.time_budget_s:
                        log(f"  {key}: not run, --time-budget-s {a.time_budget_s:g} spent (rerun to resume)")
                        continue
                    else:
                        spec = {"variant": v, "length": T, "path": model["path"], "config": model["config"]} | {
                            k: getattr(a, k) for k in ("delta", "device", "dtype", "budget_gib", "q_block", "kv_block",
                                                       "loss_block", "rank", "warmup")}
                        points[key] = child(spec, a.point_timeout_s)
                        log(f"  {key}: {cell(points[key])}  ({points[key].get('wall_s', 0):.0f} s, "
                            f"{time.perf_counter() - t0:.0f} s so far)")
                    write_json(path, {"settings": settings, "points": points})
                if points[key]["status"] != "ok" and not stop:
                    stop = (points[key]["status"], T)
    summary = summarise(a, points, models)
    write_json(path, {"settings": settings, "points": points, "summary": summary, "command": a.command})
    table = markdown(a, summary)
    (out / "bpt-table.md").write_text(table + f"\nProduced by: `{a.command}`\n")
    plot(a, summary, out / "bpt-memory.png")
    print(table + f"\n-> {path}, {out / 'bpt-table.md'}, {out / 'bpt-memory.png'}")
    return 0


# ----------------------------------------------------------------------------- the books

def run_book(spec: dict) -> dict:
    """One (variant, book): Temp-LoRA over the book's first spec["tokens"] tokens, written to spec["path"]."""
    cfg = TempLoRAConfig(**spec["config"])
    loss_fn = partial(bpt.block_loss, q_block=spec["blockwise"]) if spec["blockwise"] else block_loss
    model, tok = load_llama(spec["model"], spec["device"], DTYPES[spec["dtype"]])
    ids = tok.encode(Path(spec["text"]).read_text(encoding="utf-8"), bos=tok.bos_id is not None)[: spec["tokens"] + 1]
    if len(ids) < spec["tokens"] + 1:
        raise ValueError(f"{spec['text']}: {len(ids)} tokens, fewer than --tokens {spec['tokens']} + 1")
    cuda = torch.device(spec["device"]).type == "cuda"

    def progress(chunks, done, total, elapsed):
        if len(chunks) % 8 == 0 or done == total:
            log(f"  block {len(chunks)}: ppl base {perplexity(chunks, 'base'):.2f}, Temp-LoRA "
                f"{perplexity(chunks, 'templora'):.2f}, {elapsed:.0f} s")
    r = evaluate(model, ids, cfg, progress=progress, loss_fn=loss_fn)
    peak = (torch.cuda.max_memory_allocated(spec["device"]) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    r |= spec["wanted"] | {"book": spec["book"], "variant": spec["variant"], "command": spec["command"],
                           "model_label": model_label(spec["model"]), "peak_memory_mib": peak,
                           "peak_memory": "torch.cuda.max_memory_allocated of this run" if cuda else
                           "ru_maxrss of this run's process (one process per variant and book)"}
    write_json(Path(spec["path"]), r)
    return r


def books_main(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = replace(REPLICATION, **QUICK_KNOBS) if a.quick else REPLICATION
    variants = {f"LT{a.short_context}": (replace(base, context=a.short_context), 0),   # (knobs, B_q of the step)
                f"LT{a.long_context}": (replace(base, context=a.long_context), a.blockwise)}
    books = a.book_ids.split(",")
    texts = {b: Path(a.books_dir) / f"{b}.txt" for b in books}
    missing = [str(p) for p in texts.values() if not p.is_file()]
    if missing:
        raise ValueError(f"--books-dir: no {', '.join(missing)}")
    t0, results = time.perf_counter(), {}
    for book in books:  # book by book: should the time budget run out, the finished books have both variants
        for variant, (cfg, blockwise) in variants.items():
            path = out / f"bpt-{variant}-{book}.json"
            wanted = {"config": config_record(cfg) | {"blockwise": blockwise}, "model": str(Path(a.model).resolve()),
                      "dtype": a.dtype, "device": a.device, "text_tokens": a.tokens + 1}
            if path.exists() and not a.force:
                stored = json.loads(path.read_text())
                stored["config"] = with_default_knobs(stored["config"])
                differ = [k for k in wanted if stored.get(k) != wanted[k]]
                if differ:
                    raise ValueError(f"{path} was made with other settings ({', '.join(differ)}); "
                                     "rerun with --force or another --out")
                results[variant, book] = stored
                continue
            if time.perf_counter() - t0 > a.time_budget_s:
                log(f"{path.name}: not run, --time-budget-s {a.time_budget_s:g} spent (rerun to resume)")
                continue
            log(f"{variant} (L_T={cfg.context}{f', blockwise B_q={blockwise}' if blockwise else ''}), "
                f"book {book}, in a fresh process (its peak memory is this run's alone)")
            spec = {"config": asdict(cfg), "blockwise": blockwise, "model": str(a.model), "device": a.device,
                    "dtype": a.dtype, "tokens": a.tokens, "text": str(texts[book]), "book": book, "variant": variant,
                    "command": a.command, "wanted": wanted, "path": str(path)}
            done = subprocess.run([sys.executable, "-m", "bench.bpt", "book", json.dumps(spec)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
            if done.returncode != 0 or not path.exists():
                raise ValueError(f"{variant} on book {book} failed (exit {done.returncode}; its error is above); "
                                 f"the finished results are kept in {out}")
            r = results[variant, book] = json.loads(path.read_text())
            log(f"  ppl base {r['ppl_base']:.3f}, Temp-LoRA {r['ppl_templora']:.3f}; {r['timings']['total_s']:.0f} s, "
                f"peak {r['peak_memory_mib']:.0f} MiB -> {path}")
    lines = ["| variant | books | ppl base | ppl Temp-LoRA | change | Temp-LoRA wall s (score + train) | train s | "
             "peak MiB |", "|---" * 8 + "|"]
    for variant in variants:
        rs = [results[variant, b] for b in books if (variant, b) in results]
        if not rs:
            continue
        chunks = [c for r in rs for c in r["chunks"]]
        base, tl = perplexity(chunks, "base"), perplexity(chunks, "templora")
        wall = sum(r["timings"]["score_templora_s"] + r["timings"]["train_s"] for r in rs)
        lines.append(f"| {variant} | {', '.join(r['book'] for r in rs)} | {base:.3f} | {tl:.3f} | "
                     f"{100 * (tl / base - 1):+.2f}% | {wall:.0f} | {sum(r['timings']['train_s'] for r in rs):.0f} | "
                     f"{max(r['peak_memory_mib'] for r in rs):.0f} |")
    text = "\n".join(lines) + f"\n\nPooled exp(mean NLL) over the books. Produced by: `{a.command}`\n"
    (out / "bpt-books.md").write_text(text)
    print(text)
    return 0


# ----------------------------------------------------------------------------- command line

def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    def common(sp, budget_s):
        sp.add_argument("--model", required=True, help="checkpoint directory (SmolLM2 for the published numbers)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on a CPU")
        sp.add_argument("--out", required=True, help="folder for the JSON, markdown and plot")
        sp.add_argument("--time-budget-s", type=float, default=budget_s, help="start no new work after this many seconds")
        sp.add_argument("--force", action="store_true", help="redo what is already in --out")
        sp.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test on a tiny checkpoint")

    t = sub.add_parser("table", help="peak memory and time of one adapter step against the training length")
    common(t, 240)
    t.add_argument("--lengths", help=f"training lengths T = L_T + Δ (default {LENGTHS}; quick {QUICK_TABLE['lengths']})")
    t.add_argument("--delta", type=int, help=f"Δ, the tokens with a loss (default {REPLICATION.delta})")
    t.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    t.add_argument("--models", default=",".join(MODELS), help="smollm2 (--model), llama1b (its shapes, random weights)")
    t.add_argument("--budget-gib", type=float, default=8.0, help="the memory budget (GiB) every variant must fit")
    t.add_argument("--q-block", type=int, help="B_q (default 1024, the paper's query chunk)")
    t.add_argument("--kv-block", type=int, help="B_kv, reading form only (default 2048, the official key chunk)")
    t.add_argument("--loss-block", type=int, help="rows of logits at a time (default 256)")
    t.add_argument("--rank", type=int, help=f"LoRA rank (default {REPLICATION.rank})")
    t.add_argument("--llama1b-layers", type=int,
                   help="layers of the 1B shapes (default 16; quick 2); fewer than 16: run N and N/2, extrapolate to 16")
    t.add_argument("--point-timeout-s", type=float, default=150.0, help="a child running longer is recorded as timeout")
    t.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="one step per point, timed as it is (a CPU's long points); default: two, the second timed")
    b = sub.add_parser("books", help="Temp-LoRA at L_T=512 against a long L_T run blockwise, on the eval books")
    common(b, 240)
    b.add_argument("--books-dir", default=str(EVAL_BOOKS), help="folder with <id>.txt (default: pg19-templora40 "
                   "of python -m tools.pg19)")
    b.add_argument("--book-ids", default=BOOK_IDS)
    b.add_argument("--tokens", type=int, help="scored tokens per book (default 32768)")
    b.add_argument("--short-context", type=int, help=f"L_T of the replication (default {REPLICATION.context})")
    b.add_argument("--long-context", type=int, help="the long L_T, computed blockwise (default 4096)")
    b.add_argument("--blockwise", type=int, help="B_q of the long-L_T step (default 1024)")
    pt = sub.add_parser("point", help="(internal) one table point, run by `table` in a fresh process")
    pt.add_argument("spec")
    bk = sub.add_parser("book", help="(internal) one variant on one book, run by `books` in a fresh process")
    bk.add_argument("spec")
    a = p.parse_args(argv)
    if a.mode in ("point", "book"):
        return a
    a.command = "python -m bench.bpt " + shlex.join(argv)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    defaults = (dict(lengths=LENGTHS, delta=REPLICATION.delta, q_block=1024, kv_block=2048, loss_block=256,
                     rank=REPLICATION.rank, llama1b_layers=FULL_1B_LAYERS) if a.mode == "table" else
                dict(tokens=32768, short_context=REPLICATION.context, long_context=4096, blockwise=1024))
    for key, value in (defaults | ((QUICK_TABLE if a.mode == "table" else QUICK_BOOKS) if a.quick else {})).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.mode == "table":
        a.lengths = [int(x) for x in str(a.lengths).split(",")]
        a.variants = [v for v in VARIANTS if v in a.variants.split(",")]  # in the table's order
        a.models = [m for m in MODELS if m in a.models.split(",")]
        if not a.variants or not a.models:
            p.error(f"--variants: choose from {', '.join(VARIANTS)}; --models from {', '.join(MODELS)}")
        if min(a.lengths) < a.delta or a.lengths != sorted(a.lengths):
            p.error(f"--lengths must be ascending and at least --delta ({a.delta})")
        if not 2 <= a.llama1b_layers <= FULL_1B_LAYERS:  # below 16 it runs N and N/2: N/2 must be a layer
            p.error(f"--llama1b-layers must be 2..{FULL_1B_LAYERS}")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.mode == "point":
        print("RESULT " + json.dumps(run_point(json.loads(a.spec))), flush=True)
        return 0
    if a.mode == "book":
        try:
            run_book(json.loads(a.spec))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if a.mode == "books" or "smollm2" in a.models:
        require_model(a.model)
    if a.mode == "books":
        require_books(a.books_dir, "--books-dir", a.book_ids.split(","))
    try:
        return table_main(a) if a.mode == "table" else books_main(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
