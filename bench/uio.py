"""UIO-LLMs on PG19 (methods/uio.py): train the memory with three truncations of BPTT, score the held-out books
by position beside the base model, and measure peak memory and time against text length.

    python -m bench.uio --model DIR --books-dir DIR --train-books-dir DIR --device cuda --out DIR
    python -m bench.uio --quick ...      # smoke-test sizes: seconds on a CPU with a tiny checkpoint

Three parts, in this order, each resumable (a finished part is skipped; one made with other settings is an
error, never mixed in), every result written atomically as soon as it is complete:

1. train    for each --train-variants truncation (recent, reservoir, full): --train-texts texts of
            --train-segments segments of --segment tokens from --train-books-dir (the first window of every book,
            then the second, ...), one AdamW step per text, every truncation the same --train-texts steps (the
            lr schedule ends at 0 on the last of them; no time guard cuts a run short). The training texts are
            at least as long as the scored text (--tokens), so the memory is never read after more memories than
            it trained with. Writes train-<variant>/uio.safetensors (e and both LoRAs) and uio.json (settings,
            losses, tokens seen); while it trains, checkpoint.safetensors (+ AdamW moments) every --save-every
            steps, from which an interrupted run resumes.
2. eval     every --book-ids book of --books-dir, the first --tokens scored tokens, blocks of Δ = --segment
            (protocol.evaluate_blocks): base-w<W> (the base model, sliding window W: the reference, same run),
            nomemory (each segment alone), untrained (fresh adapters and e), and each trained variant.
            One JSON per (variant, book): uio-<variant>-<book>.json, the protocol's shape.
3. scaling  peak memory and time against text length: the first N tokens of the first book for N in
            --scaling-tokens (base-w<W> and UIO), and one training text of n segments for n in
            --scaling-segments (each truncation; gradient only). torch.cuda.max_memory_allocated on CUDA
            (None on a CPU). Writes uio-scaling.json. Empty --scaling-tokens and --scaling-segments skip it.

The form of the memory (methods/uio.py): by default a BOS key/value at position 0 ahead of the memories (the
attention sink) and no layer-0 memory; --no-sink and --layer0-memory give the paper's form, flag by flag.
"""
import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from bench.common import (EVAL_BOOKS, MODEL_DIR, RESULTS, TRAIN_BOOKS, model_label, path_label, require_books,
                          require_model, stored)
from bench.compare import BUCKETS
from bench.flops import FlopCounter, uio_flops
from load_llama import load_llama
from methods.uio import BPTT_MODES, UIO, Reader, UIOConfig, check_sizes, text_gradient, train_step
from protocol import Window, evaluate_blocks, perplexity, score_block, write_text_atomic
from cli import DTYPES
from train_block import make_optimizer

# the command as results record it: absolute paths by path_label, so a result does not depend on the machine
COMMAND = "python -m bench.uio " + shlex.join(path_label(x) if os.path.isabs(x) else x for x in sys.argv[1:])
BOOK_IDS = "349,718,1684,2021"  # the replication's held-out books
# full: one H100 (200 steps of 32 x 1024 tokens per truncation, about 23 minutes each at the 4,200-5,100 tokens/s
# measured there, docs/uio.md); quick: a tiny checkpoint on a CPU
SIZES = {
    "full": dict(segment=1024, memories=32, rank=32, alpha=128.0, train_texts=200, train_segments=32, save_every=16,
                 tokens=32768, base_window=2048, scaling_tokens="8192,32768,131072", scaling_segments="2,4,8,16"),
    "quick": dict(segment=32, memories=4, rank=4, alpha=16.0, train_texts=2, train_segments=4, save_every=1,
                  tokens=128, base_window=64, scaling_tokens="64,128", scaling_segments="2,3"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--books-dir", default=str(EVAL_BOOKS), help="evaluation books (never trained on)")
    p.add_argument("--train-books-dir", default=str(TRAIN_BOOKS), help="training text: other PG19 books")
    p.add_argument("--book-ids", default=BOOK_IDS, help="comma-separated evaluation book ids (file stems)")
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes {SIZES['quick']}")
    full = SIZES["full"]
    p.add_argument("--segment", type=int, help=f"L: tokens per segment = the blocks Δ scored (full {full['segment']})")
    p.add_argument("--memories", type=int, help=f"M: memory tokens per segment (full {full['memories']})")
    p.add_argument("--rank", type=int, help=f"LoRA r of both adapters (full {full['rank']}; official 128)")
    p.add_argument("--alpha", type=float, help=f"LoRA α, scale α/r (full {full['alpha']:g}; official 512)")
    p.add_argument("--reservoir", type=int, default=2, help="k: live encoder graphs of recent and reservoir")
    p.add_argument("--train-variants", default="recent,reservoir,full",
                   help=f"truncations to train, from {', '.join(BPTT_MODES)}")
    p.add_argument("--train-texts", type=int, help=f"texts = optimizer steps per variant (full {full['train_texts']})")
    p.add_argument("--train-segments", type=int, help=f"segments per training text (full {full['train_segments']})")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW lr: warm-up 1%% of the steps, cosine to 0")
    p.add_argument("--betas", default="0.9,0.95")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--save-every", type=int, help="steps between training checkpoints")
    p.add_argument("--tokens", type=int, help=f"scored tokens per book (full {full['tokens']})")
    p.add_argument("--base-window", type=int, help=f"W of the base model's sliding window (full {full['base_window']})")
    p.add_argument("--scaling-tokens", help=f"text lengths of the scaling runs (full {full['scaling_tokens']})")
    p.add_argument("--scaling-segments", help=f"training text lengths in segments (full {full['scaling_segments']})")
    p.add_argument("--no-sink", action="store_true", help="no BOS key/value ahead of the memories (the paper's)")
    p.add_argument("--layer0-memory", action="store_true", help="keep the layer-0 memory RMSNorm(e) (the paper's)")
    p.add_argument("--no-references", action="store_true", help="score only the memory variants (untrained, trained), "
                   "not base-w<W> and nomemory, which are the same in every form of the memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="bfloat16 on cuda, float32 on a CPU (default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    for key, value in SIZES["quick" if a.quick else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    try:
        a.betas = tuple(float(b) for b in a.betas.split(","))
        a.scaling_tokens = [int(n) for n in a.scaling_tokens.split(",") if n]
        a.scaling_segments = [int(n) for n in a.scaling_segments.split(",") if n]
    except ValueError:
        p.error("--betas, --scaling-tokens and --scaling-segments are comma-separated numbers")
    a.train_variants = [v for v in a.train_variants.split(",") if v]
    a.book_ids = [b for b in a.book_ids.split(",") if b]
    if any(v not in BPTT_MODES for v in a.train_variants):
        p.error(f"--train-variants: each of {', '.join(BPTT_MODES)}, got {','.join(a.train_variants)}")
    if len(a.betas) != 2 or not a.book_ids:
        p.error("--betas needs two numbers and --book-ids at least one book")
    if min(a.train_texts, a.train_segments, a.save_every, a.tokens, *a.scaling_tokens, *a.scaling_segments) < 1:
        p.error("--train-texts, --train-segments, --save-every, --tokens and the scaling lengths must be >= 1")
    if not a.lr > 0 or not a.clip > 0:
        p.error("--lr and --clip must be positive")
    if a.tokens % a.segment:
        p.error(f"--tokens ({a.tokens}) must be a multiple of --segment ({a.segment}): blocks = segments")
    if a.train_variants and a.tokens > a.train_segments * a.segment:
        p.error(f"--tokens ({a.tokens}) is longer than the training texts (--train-segments {a.train_segments} x "
                f"--segment {a.segment}): the memory would be read after more memories than it trained with")
    if not a.segment < a.base_window:
        p.error(f"--base-window ({a.base_window}) must be larger than --segment ({a.segment})")
    return a


def uio_config(a: argparse.Namespace, bptt: str = "reservoir") -> UIOConfig:
    return UIOConfig(segment=a.segment, memories=a.memories, rank=a.rank, alpha=a.alpha, bptt=bptt,
                     keep=a.reservoir, memory_init=a.memory_init, seed=a.seed, sink=not a.no_sink,
                     layer0_memory=a.layer0_memory, bos=a.bos)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def write_json(path: Path, data: dict) -> None:
    """protocol's atomic write, not its strict JSON: these logs may hold NaN (a skipped step's gradient norm)."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------- text

def first_tokens(path: Path, tok, need: int) -> list[int]:
    """The first `need` token ids of a book (BOS first), or fewer if the book is shorter. Only a prefix of the
    text is tokenized when it holds enough tokens: ids far from the cut are those of the whole text."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as UTF-8 text ({e})") from None
    bos = tok.bos_id is not None
    ids = tok.encode(text[: 8 * need + 4096], bos=bos)
    if len(ids) < need + 256 and len(text) > 8 * need + 4096:  # 256 tokens of margin before the cut
        ids = tok.encode(text, bos=bos)
    return ids[:need]


def book_paths(folder: str) -> list[Path]:
    return sorted(Path(folder).glob("*.txt"), key=lambda p: (len(p.stem), p.stem))


def training_texts(a: argparse.Namespace, tok, count: int, length: int) -> list[tuple[str, list[int]]]:
    """`count` texts of `length` tokens: the first window of every training book (by id), then the second...
    Books shorter than a window are passed over. Each text is named book:window."""
    books = book_paths(a.train_books_dir)
    eval_dir = Path(a.books_dir).resolve()
    clash = [p.stem for p in books if p.stem in a.book_ids or p.parent.resolve() == eval_dir]
    if clash or not books:
        raise ValueError(f"--train-books-dir {a.train_books_dir}: " + (
            f"holds evaluation books ({', '.join(clash[:5])}): never train on them" if clash else "no *.txt books"))
    texts, window = [], 0
    while len(texts) < count:
        added = 0
        for path in books:
            if len(texts) == count:
                break
            ids = first_tokens(path, tok, (window + 1) * length)
            if len(ids) == (window + 1) * length:
                texts.append((f"{path.stem}:{window}", ids[window * length:]))
                added += 1
        if not added:
            raise ValueError(f"--train-books-dir {a.train_books_dir}: only {len(texts)} texts of {length} tokens, "
                             f"--train-texts asks for {count}")
        window += 1
    return texts


# ----------------------------------------------------------------------------- 1. train

def train_settings(a: argparse.Namespace, variant: str) -> dict:
    return {"uio": asdict(uio_config(a, variant)), "texts": a.train_texts, "segments": a.train_segments,
            "lr": a.lr, "betas": list(a.betas), "weight_decay": a.weight_decay, "clip": a.clip,
            "schedule": "linear warm-up over 1% of the steps from lr/steps, then cosine to 0 at the last step",
            "train_books_dir": path_label(a.train_books_dir), "model": path_label(a.model),
            "dtype": a.dtype}


def lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, round(0.01 * steps))
    if step < warmup:
        return lr * (step + 1) / warmup  # never 0: the first step trains too
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def save_checkpoint(path: Path, uio: UIO, optimizer, settings: dict, state: dict) -> None:
    """The trained tensors, AdamW's moments and the progress, in one safetensors file written atomically."""
    tensors = {name: t.detach().contiguous() for name, t in uio.tensors().items()}
    for i, moments in optimizer.state_dict()["state"].items():
        tensors |= {f"adamw.{i}.{key}": value.detach().reshape(1).contiguous() if value.dim() == 0 else
                    value.detach().contiguous() for key, value in moments.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"settings": json.dumps(settings), "state": json.dumps(state)})
    tmp.replace(path)


def load_checkpoint(path: Path, uio: UIO, optimizer, settings: dict) -> dict:
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    if json.loads(meta["settings"]) != settings:
        raise ValueError(f"{path} was made with other settings; choose another --out")
    tensors = load_file(path, device=str(uio.memory.device))
    uio.load({name: tensors[name] for name in uio.tensors()})
    sd = optimizer.state_dict()
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adamw."):
            _, i, name = key.split(".")
            moments.setdefault(int(i), {})[name] = value.reshape(()) if name == "step" else value
    sd["state"] = moments
    optimizer.load_state_dict(sd)
    return json.loads(meta["state"])


def train_variant(a: argparse.Namespace, model, texts: list[tuple[str, list[int]]], variant: str) -> dict:
    """Train UIO with truncation `variant` on `texts`, resuming from a checkpoint; returns uio.json's content."""
    folder = Path(a.out) / f"train-{variant}"
    folder.mkdir(parents=True, exist_ok=True)
    settings = train_settings(a, variant)
    done = stored(folder / "uio.json", {"settings": settings})
    if done:
        log(f"train {variant}: done before ({done['steps']} steps), {folder}")
        return done
    device = model.tok_embeddings.weight.device
    uio = UIO(model, uio_config(a, variant))
    try:
        optimizer = make_optimizer(uio.parameters(), a.lr, a.weight_decay, a.betas, eps=1e-8)
        state = {"steps": 0, "losses": [], "grad_norms": [], "seconds": 0.0}
        ckpt = folder / "checkpoint.safetensors"
        if ckpt.exists():
            state = load_checkpoint(ckpt, uio, optimizer, settings)
            log(f"train {variant}: resuming at step {state['steps']} from {ckpt}")
        while state["steps"] < a.train_texts:
            step = state["steps"]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, a.train_texts, a.lr)
            ids = torch.tensor([texts[step][1]], device=device)
            tic = clock(device)
            loss, norm = train_step(model, uio, optimizer, ids, random.Random(a.seed * 1_000_003 + step), a.clip)
            state["seconds"] += clock(device) - tic
            state["steps"] += 1
            state["losses"].append(loss)
            state["grad_norms"].append(norm)
            if step % 8 == 0 or state["steps"] == a.train_texts:
                log(f"train {variant}: step {state['steps']}/{a.train_texts} text {texts[step][0]} loss {loss:.4f} "
                    f"grad norm {norm:.3f} lr {lr_at(step, a.train_texts, a.lr):.2e} {state['seconds']:.0f} s")
            if state["steps"] % a.save_every == 0 or state["steps"] == a.train_texts:
                save_checkpoint(ckpt, uio, optimizer, settings, state)
        tensors = {name: t.detach().contiguous() for name, t in uio.tensors().items()}
        save_file(tensors, folder / "uio.tmp")
        (folder / "uio.tmp").replace(folder / "uio.safetensors")
        steps = state["steps"]
        summary = {"settings": settings, "steps": steps, "texts": [name for name, _ in texts[:steps]],
                   "tokens_seen": steps * a.train_segments * a.segment, "losses": state["losses"],
                   "grad_norms": state["grad_norms"], "train_s": state["seconds"],
                   "lr_last": lr_at(steps - 1, a.train_texts, a.lr), "device": a.device, "command": COMMAND,
                   "parameters": sum(t.numel() for t in tensors.values()), "adapters": str(folder / "uio.safetensors")}
        write_json(folder / "uio.json", summary)
        ckpt.unlink()  # finished: uio.json marks it done, and the AdamW moments are twice the adapters' size
        first, last = state["losses"][: max(1, steps // 8)], state["losses"][-max(1, steps // 8):]
        log(f"train {variant}: {steps} steps, {summary['tokens_seen']} tokens in {state['seconds']:.0f} s; loss "
            f"{sum(first) / len(first):.4f} (first eighth) -> {sum(last) / len(last):.4f} (last eighth)")
        return summary
    finally:
        uio.remove()


# ----------------------------------------------------------------------------- 2. eval

def eval_settings(a: argparse.Namespace, variant: str, tokens: int, training: dict | None) -> dict:
    if variant.startswith("base-w"):
        config = {"window": a.base_window, "keep": a.base_window // 2, "delta": a.segment}
    else:
        config = asdict(uio_config(a, variant if variant in BPTT_MODES else "reservoir")) | {
            "delta": a.segment, "memory": variant != "nomemory", "training": training and training["settings"]}
    return {"variant": variant, "config": config, "model": path_label(a.model), "dtype": a.dtype,
            "device": a.device, "text_tokens": tokens + 1}


def evaluate_variant(a: argparse.Namespace, model, variant: str, ids: list[int], training: dict | None,
                     progress=None) -> dict:
    """Score ids by the block protocol with one variant; the protocol's result plus timings by phase and FLOPs."""
    device = model.tok_embeddings.weight.device
    if variant.startswith("base-w"):
        window = Window(model, a.base_window, a.base_window // 2)
        with FlopCounter(model) as counter:
            def step(i: int, start: int, end: int) -> dict:
                tic = clock(device)
                nll = score_block(model, window, ids, start, end)
                return {"nll_base": nll, "seconds": {"score_base": clock(device) - tic}, "flops": counter.take()}
            result = evaluate_blocks(ids, a.segment, step, progress)
        phases = ("score_base",)
    else:
        bptt = variant if variant in BPTT_MODES else "reservoir"  # untrained: any, it never trains
        uio = None if variant == "nomemory" else UIO(model, uio_config(a, bptt))
        try:
            if training is not None:
                uio.load(load_file(training["adapters"], device=str(device)))
            reader = Reader(model, uio, ids, a.segment)

            def step(i: int, start: int, end: int) -> dict:
                out = reader(i, start, end)
                return out | {"flops": uio_flops(model.args, end - start, out["memory_positions"], a.memories,
                                                 a.rank, encode=uio is not None and end < len(ids))}
            result = evaluate_blocks(ids, a.segment, step, progress)
        finally:
            if uio is not None:
                uio.remove()
        phases = ("decode", "encode")
    chunks = result["chunks"]
    result["timings"] |= {f"{ph}_s": sum(c["seconds"][ph] for c in chunks) for ph in phases}
    result["flops"] = {ph: sum(c["flops"][ph] for c in chunks) for ph in phases}
    return result


def block_progress(variant: str, book: str):
    def progress(chunks: list[dict], done: int, total: int, elapsed: float) -> None:
        if len(chunks) % 8 == 0 or done == total:
            name = [k for k in chunks[-1] if k.startswith("nll_")][0][len("nll_"):]
            log(f"  {variant} {book}: block {len(chunks)}, {done - 1}/{total - 1} tokens, "
                f"ppl so far {perplexity(chunks, name):.3f}, {done / elapsed:.0f} tok/s")
    return progress


# ----------------------------------------------------------------------------- 3. scaling

def peak_run(device: torch.device, run) -> tuple[dict, float | None, float]:
    """run() with the device's peak memory counter reset first: (its result, peak MiB or None on a CPU, seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = clock(device)
    result = run()
    seconds = clock(device) - tic
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return result, peak, seconds


def scaling(a: argparse.Namespace, model, ids: list[int], train_ids: list[int], trained: dict) -> dict:
    device = model.tok_embeddings.weight.device
    uio_variant = "reservoir" if "reservoir" in trained else (a.train_variants or ["untrained"])[0]
    out = {"floor_mib": torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None,
           "eval": [], "train": [], "eval_uio_variant": uio_variant}
    for n in a.scaling_tokens:
        for variant in (f"base-w{a.base_window}", uio_variant):
            r, peak, seconds = peak_run(device, lambda: evaluate_variant(a, model, variant, ids[: n + 1],
                                                                         trained.get(variant)))
            name = "base" if variant.startswith("base-w") else "uio"
            out["eval"].append({"variant": variant, "tokens": n, "peak_mib": peak, "wall_s": seconds,
                                "ppl": r[f"ppl_{name}"], "max_positions": max(
                                    c.get("memory_positions", 0) + c["tokens"] for c in r["chunks"])})
            log(f"scaling eval {variant} {n} tokens: peak {peak} MiB, {seconds:.1f} s, ppl {r[f'ppl_{name}']:.3f}")
    for n in a.scaling_segments:
        for bptt in BPTT_MODES:
            uio = UIO(model, uio_config(a, bptt))
            try:
                text = torch.tensor([train_ids[: n * a.segment + 1]], device=device)
                loss, peak, seconds = peak_run(device, lambda: text_gradient(model, uio, text, random.Random(a.seed)))
            finally:
                uio.remove()
            out["train"].append({"bptt": bptt, "segments": n, "peak_mib": peak, "wall_s": seconds, "loss": loss})
            log(f"scaling train {bptt} {n} segments: peak {peak} MiB, {seconds:.1f} s")
    return out


# ----------------------------------------------------------------------------- main

def summary_table(results: dict[str, list[dict]]) -> str:
    """Perplexity by position pooled over the books, one row per variant (each its own scorer)."""
    starts = [c["start"] for rs in results.values() for r in rs for c in r["chunks"]]
    buckets = [(lo, hi, n) for lo, hi, n in BUCKETS if any(lo <= s < hi for s in starts)]
    lines = ["| variant | " + " | ".join(n for _, _, n in buckets) + " | all |", "|---" * (len(buckets) + 2) + "|"]
    for variant, rs in results.items():
        chunks = [c for r in rs for c in r["chunks"]]
        name = "base" if variant.startswith("base-w") else "uio"
        cells = [f"{perplexity([c for c in chunks if lo <= c['start'] < hi], name):.3f}" for lo, hi, _ in buckets]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | **{perplexity(chunks, name):.3f}** |")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_llama(a.model, a.device, DTYPES[a.dtype])
    # e starts from BOS's embedding: of the starts tried on SmolLM2 (the mean embedding, token 2, BOS, zeros;
    # untrained, book 349, 8 blocks of 256 tokens, M = 16, the paper's form) the memory hurt least from BOS:
    # perplexity 50 without memory, then 194, 124, 86, 98. BOS is also the sink's token.
    a.memory_init = a.bos = tok.bos_id
    if a.bos is None and not a.no_sink:
        raise ValueError(f"{a.model}: the tokenizer has no BOS token for the sink; pass --no-sink")
    label = model_label(a.model)
    log(f"{label}: {a.dtype} on {a.device}; UIO L={a.segment} M={a.memories} r={a.rank} α={a.alpha:g} k={a.reservoir}"
        f" sink {'off' if a.no_sink else 'on'}, layer-0 memory {'on' if a.layer0_memory else 'off'}")
    # every check before the first minute of compute, not after it
    check_sizes(uio_config(a), model.args.max_seq_len, max([a.train_segments, *a.scaling_segments,
                                                           math.ceil(max([a.tokens, *a.scaling_tokens]) / a.segment)]))
    if a.base_window > model.args.max_seq_len:
        raise ValueError(f"--base-window ({a.base_window}) exceeds the model's max_position_embeddings "
                         f"({model.args.max_seq_len})")
    books = {}
    for book in a.book_ids:  # the first book also serves the scaling runs, up to the longest of them
        path = Path(a.books_dir) / f"{book}.txt"
        if not path.exists():
            raise ValueError(f"--books-dir {a.books_dir}: no {book}.txt (--book-ids)")
        need = 1 + (max([a.tokens, *a.scaling_tokens]) if book == a.book_ids[0] else a.tokens)
        books[book] = first_tokens(path, tok, need)
        if len(books[book]) < need:
            raise ValueError(f"book {book} has {len(books[book])} tokens, fewer than the {need} needed "
                             "(--tokens + 1, and for the first book the longest --scaling-tokens + 1)")
    length = a.train_segments * a.segment + 1
    texts = training_texts(a, tok, a.train_texts, length) if a.train_variants else []
    scaling_text = (training_texts(a, tok, 1, max(a.scaling_segments) * a.segment + 1)[0][1]
                    if a.scaling_segments else [])
    if texts:
        log(f"{len(texts)} training texts of {length} tokens ({len(texts) * (length - 1)} target tokens per variant)")

    # 1. train
    trained = {variant: train_variant(a, model, texts, variant) for variant in a.train_variants}

    # 2. eval
    variants = [*([] if a.no_references else [f"base-w{a.base_window}", "nomemory"]), "untrained", *a.train_variants]
    results = {}
    for variant in variants:
        results[variant] = []
        for book in a.book_ids:
            path = out / f"uio-{variant}-{book}.json"
            settings = eval_settings(a, variant, a.tokens, trained.get(variant))
            r = stored(path, settings)
            if r is None:
                r = evaluate_variant(a, model, variant, books[book][: a.tokens + 1], trained.get(variant),
                                     block_progress(variant, book))
                r |= settings | {"book": book, "model_label": label, "command": COMMAND}
                write_json(path, r)
                scorer = [k for k in r if k.startswith("ppl_")][0]
                log(f"{variant} {book}: {scorer} {r[scorer]:.3f}, {r['timings']['total_s']:.1f} s -> {path}")
            results[variant].append(r)

    # 3. scaling (empty --scaling-tokens and --scaling-segments: skipped)
    path = out / "uio-scaling.json"
    settings = {"scaling_tokens": a.scaling_tokens, "scaling_segments": a.scaling_segments, "book": a.book_ids[0],
                "config": asdict(uio_config(a)) | {"base_window": a.base_window, "training": {
                    v: t["settings"] for v, t in trained.items()}},
                "model": path_label(a.model), "dtype": a.dtype, "device": a.device}
    if (a.scaling_tokens or a.scaling_segments) and stored(path, settings) is None:
        write_json(path, settings | scaling(a, model, books[a.book_ids[0]], scaling_text, trained)
                   | {"command": COMMAND, "model_label": label})
    table = summary_table(results)
    print(f"# UIO-LLMs, {label}: perplexity by position, books {', '.join(a.book_ids)}, {a.tokens} tokens each\n")
    print(table)


def main(argv=None) -> int:
    a = parse_args(argv)
    require_model(a.model)  # before the model is loaded or anything written
    require_books(a.books_dir, "--books-dir", a.book_ids)
    if a.train_variants or a.scaling_segments:
        require_books(a.train_books_dir, "--train-books-dir", ())
    try:
        run(a)
    except ValueError as e:  # bad files, knobs and sizes end here, in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
