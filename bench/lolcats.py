"""LoLCATs on PG19: linearise the model (Hedgehog feature maps beside a 64-token softmax window), run the attention
transfer, then LoRA, on the training books; score the held-out books after each step with the state carried over
the whole text, beside the base model in the same run.

    python -m bench.lolcats --quick --model TINY --books-dir D --book-ids 1 --train-books-dir T --out O   # seconds
    python -m bench.lolcats --model DIR --books-dir DIR --train-books-dir DIR --out bench/results/lolcats-cpu \\
        --threads 2                                                    # the CPU run of docs/lolcats.md, ~10 min

What it does, in order; every result is written atomically when done, and a rerun skips what is done (a result
or checkpoint made with other settings is an error, never mixed in):
  reference   the base model with a window of --base-window tokens (protocol.Window): lolcats-base-w<W>-<book>.json
  transfer    --transfer-steps steps of attention transfer (checkpoints in <ckpt-dir>), then the books scored:
              lolcats-transfer-<book>.json (scorer "transfer")
  lora        --lora-steps steps of LoRA, then the books scored: lolcats-lolcats-<book>.json (scorer "lolcats");
              --lora-steps 0 leaves this stage out
  report      lolcats-train.json (losses, tokens, wall time of each step) and lolcats-summary.md
"""
import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import (EVAL_BOOKS, MODEL_DIR, TRAIN_BOOKS, model_label, path_label, require_books, require_model,
                          stored)
from bench.supra import read_books, training_sequences
from load_llama import load_model, load_tokenizer, read_json
from methods import lolcats
from methods.supra import (ADAM_EPS, load_optimizer_state, load_tensors, next_token_loss, read_checkpoint_config,
                           save_checkpoint, score_block)
from protocol import evaluate_blocks, perplexity, position_buckets, write_json, write_text_atomic
from templora import TempLoRAConfig, evaluate
from train_block import make_optimizer

COMMAND = "python -m bench.lolcats " + shlex.join(sys.argv[1:])
BUCKETS = position_buckets((0, 4096, 8192, 16384, 32768))
# cpu: books 349 and 718, their first 8K tokens (the part of compare.md's text that bench.bpt's CPU run scores)
SIZES = {
    "cpu": dict(tokens=8192, delta=1024, base_window=2048, base_keep=1024, transfer_steps=80, lora_steps=40,
                seq_len=1024, batch=1, save_every=10, window=lolcats.WINDOW, feature_dim=lolcats.FEATURE_DIM,
                chunk=256),
    "quick": dict(tokens=192, delta=64, base_window=128, base_keep=64, transfer_steps=4, lora_steps=3, seq_len=96,
                  batch=2, save_every=2, window=16, feature_dim=8, chunk=24),
}
HELPS = {"tokens": "scored tokens per book (the text is cut to tokens + 1)", "delta": "Δ: tokens per block",
         "base_window": "W of the base model's reference row", "base_keep": "L_x of the reference row",
         "transfer_steps": "optimizer steps of attention transfer", "lora_steps": "optimizer steps of LoRA",
         "seq_len": "training sequence length", "batch": "sequences per optimizer step",
         "save_every": "checkpoint every N steps (and at the end of each phase)",
         "window": "w: softmax keys beside the linear part", "feature_dim": "f: Hedgehog features per sign",
         "chunk": "C: query chunk of the chunked form"}


def log(msg: str) -> None:
    print(f"[lolcats] {msg}", flush=True)


def progress(label: str):
    def show(chunks, done, total, elapsed):
        if len(chunks) % 4 == 0 or done == total:
            name = next(k for k in chunks[0] if k.startswith("nll_"))[4:]
            log(f"  {label}: {done}/{total} tokens, ppl {perplexity(chunks, name):.3f}, {done / elapsed:,.0f} tok/s")
    return show


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--books-dir", default=str(EVAL_BOOKS), help="evaluation books (never trained on)")
    p.add_argument("--book-ids", default="349,718", help="comma-separated evaluation book ids (file stems)")
    p.add_argument("--train-books-dir", default=str(TRAIN_BOOKS),
                   help="training text: *.txt, read in order of name until the steps' tokens are met")
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes {SIZES['quick']}")
    for key, value in SIZES["cpu"].items():
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                       help=f"{HELPS[key]} (default {value}, quick {SIZES['quick'][key]})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="feature maps' and LoRA's init, order of the training text")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out: reference, eval")
    p.add_argument("--out", default="bench/results/lolcats-cpu")
    p.add_argument("--ckpt-dir", default=None, help="checkpoints (default: <out>/checkpoints)")
    a = p.parse_args(argv)
    for key, value in SIZES["quick" if a.quick else "cpu"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.book_ids = [b.strip() for b in a.book_ids.split(",") if b.strip()]
    a.skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    problems = [f"--skip: unknown stage {s!r}" for s in a.skip - {"reference", "eval"}]
    for key in SIZES["cpu"]:
        if getattr(a, key) < (0 if key.endswith("_steps") else 1):
            problems.append(f"--{key.replace('_', '-')} must be {'>= 0' if key.endswith('_steps') else 'positive'}")
    if not a.book_ids:
        problems.append("--book-ids: none given")
    if a.base_keep >= a.base_window:
        problems.append("--base-keep must be below --base-window")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {a.device}: CUDA is not available")
    if problems:
        p.error("; ".join(problems))
    return a


def settings(a: argparse.Namespace) -> dict:
    """What a checkpoint must have been made with to be resumed or used."""
    return {"base_model": str(Path(a.model).resolve()), "train_books_dir": path_label(a.train_books_dir),
            **{k: getattr(a, k) for k in ("transfer_steps", "lora_steps", "seq_len", "batch", "window",
                                          "feature_dim", "chunk", "seed")}}


def result_settings(a: argparse.Namespace, book: str, run: str, extra: dict) -> dict:
    return {"run": run, "book": book, "text_tokens": a.tokens + 1, "delta": a.delta, "device": a.device,
            "dtype": "float32", "model": str(Path(a.model).resolve())} | extra


# ----------------------------------------------------------------------------- the base model's row

def eval_reference(a: argparse.Namespace, books: dict, device: torch.device) -> None:
    """The base model with its softmax attention over a sliding window of W tokens, in the same run."""
    run = f"base-w{a.base_window}"
    cfg = TempLoRAConfig(delta=a.delta, window=a.base_window, keep=a.base_keep, templora=False)
    want = lambda b: result_settings(a, b, run, {"window": a.base_window, "keep": a.base_keep})  # noqa: E731
    todo = {b: ids for b, ids in books.items() if stored(Path(a.out) / f"lolcats-{run}-{b}.json", want(b)) is None}
    if not todo:
        return
    model = load_model(a.model, device, torch.float32)
    for b, ids in todo.items():
        log(f"reference: base W={a.base_window}, book {b}")
        r = evaluate(model, ids, cfg, progress=progress(f"base W={a.base_window} {b}"))
        write_json(Path(a.out) / f"lolcats-{run}-{b}.json",
                   r | want(b) | {"command": COMMAND, "model_label": model_label(a.model)})


# ----------------------------------------------------------------------------- train, one phase at a time

def train_phase(a: argparse.Namespace, index: int, model, seqs: torch.Tensor, device: torch.device) -> dict:
    """Run phase `index` of the recipe to its end, resuming from the checkpoint in <ckpt-dir>; returns the
    checkpoint's config. The model must hold the weights of the checkpoint it resumes from."""
    folder = Path(a.ckpt_dir)
    steps = [a.transfer_steps, a.lora_steps]
    tokens = [n * a.batch * a.seq_len for n in steps]
    phases = lolcats.recipe(*tokens)
    phase = phases[index]
    config = read_checkpoint_config(folder) if (folder / "config.json").exists() else None
    history = config["history"] if config else []
    first = config["step"] if config and config["phase_index"] == index else 0
    params = lolcats.phase_parameters(model, phase)
    names = sorted(set(params) | set(config["trained"] if config else ()))
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = make_optimizer(list(params.values()), phase.lr, phase.weight_decay, phase.betas, ADAM_EPS)
    if first > 0:
        load_optimizer_state(optimizer, list(params), folder / config["optimizer"])
    offset = sum(steps[:index]) * a.batch  # each phase reads its own sequences
    log(f"{phase.name}: steps {first}..{steps[index]} of {a.batch} x {a.seq_len} tokens, trains "
        f"{sum(p.numel() for p in params.values()):,} parameters, lr {phase.lr:g} (constant, no clipping)")
    model.train()
    for step in range(first, steps[index]):
        tic = time.perf_counter()
        batch = seqs[offset + step * a.batch: offset + (step + 1) * a.batch].to(device)
        if phase.loss == "attention_transfer":  # back-propagated layer by layer as it goes
            loss = lolcats.attention_transfer_loss(model, batch, backward=True)
        else:
            loss = next_token_loss(model, batch)
            loss.backward()
        # max_grad_norm None (LoLCATs: both phases): the norm is measured, never clipped
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), phase.max_grad_norm or math.inf)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise ValueError(f"{phase.name} step {step}: loss {loss.item()}, grad norm {grad_norm.item()}: "
                             "not finite, training stopped")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"phase": phase.name, "step": step, "loss": loss.item(), "lr": phase.lr,
                        "grad_norm": grad_norm.item(), "seconds": time.perf_counter() - tic})
        done = step + 1 == steps[index]
        if (step + 1) % 10 == 0 or done:
            log(f"{phase.name} step {step + 1}/{steps[index]}: loss {loss.item():.4f}, "
                f"{a.batch * a.seq_len / history[-1]['seconds']:,.0f} tokens/s")
        if (step + 1) % a.save_every == 0 or done:
            config = checkpoint(a, model, optimizer, names, phases, steps, index, step + 1, history)
    model.eval()
    # the phase is over: the next one starts from step 0 (no optimizer state to keep)
    return checkpoint(a, model, None, names, phases, steps, index + 1, 0, history)


def checkpoint(a, model, optimizer, names, phases, steps, index, step, history) -> dict:
    seen = {p.name: sum(1 for h in history if h["phase"] == p.name) for p in phases}
    config = {"base_model": str(Path(a.model).resolve()), "window": a.window, "feature_dim": a.feature_dim,
              "chunk": a.chunk, "seed": a.seed, "lora": lolcats.LORA, "settings": settings(a),
              "phases": [asdict(p) | {"steps": n, "steps_done": seen[p.name]} for p, n in zip(phases, steps)],
              "phase": phases[min(index, len(phases) - 1)].name, "phase_index": index, "step": step,
              "tokens_seen": {p.name: seen[p.name] * a.batch * a.seq_len for p in phases},
              "done": index == len(phases), "history": history}
    save_checkpoint(Path(a.ckpt_dir), model, config, names, optimizer)
    return read_checkpoint_config(Path(a.ckpt_dir))


# ----------------------------------------------------------------------------- evaluate

def eval_stage(a: argparse.Namespace, run: str, model, config: dict, books: dict) -> None:
    """Every block scored with the state of the whole text before it (the window's 64 keys and S, z)."""
    seen = dict(config["tokens_seen"])
    if run == "transfer":  # scored before LoRA's first step, whatever the checkpoint has seen since
        seen["lora"] = 0
    extra = {"train": settings(a), "tokens_seen": seen}
    todo = {b: ids for b, ids in books.items()
            if stored(Path(a.out) / f"lolcats-{run}-{b}.json", result_settings(a, b, run, extra)) is None}
    for b, ids in todo.items():
        log(f"eval: {run}, book {b}")
        state = lolcats.LoLCATsState(model)

        def step(i: int, start: int, end: int) -> dict:
            return {f"nll_{run}": score_block(model, state, ids, start, end)}
        r = evaluate_blocks(ids, a.delta, step, progress(f"{run} {b}"))
        write_json(Path(a.out) / f"lolcats-{run}-{b}.json", r | result_settings(a, b, run, extra) | {
            "config": {"method": "lolcats", "after": run, "window": a.window, "feature_dim": a.feature_dim,
                       "chunk": a.chunk, "lora": lolcats.LORA, "text_window": None},
            "state_bytes": state.nbytes(), "command": COMMAND, "model_label": model_label(a.model)})


# ----------------------------------------------------------------------------- report

def report(a: argparse.Namespace, config: dict) -> None:
    rows = []
    for run, label in ((f"base-w{a.base_window}", f"base, W={a.base_window}"),
                       ("transfer", "LoLCATs after attention transfer"), ("lolcats", "LoLCATs (transfer, then LoRA)")):
        results = [json.loads(p.read_text()) for p in (Path(a.out) / f"lolcats-{run}-{b}.json" for b in a.book_ids)
                   if p.exists()]
        if len(results) == len(a.book_ids):
            scorer = "base" if run.startswith("base") else run
            chunks = [c for r in results for c in r["chunks"]]
            cells = {n: perplexity([c for c in chunks if lo <= c["start"] < hi], scorer)
                     for lo, hi, n in BUCKETS if any(lo <= c["start"] < hi for c in chunks)}
            blocks = sorted({c["start"] for c in chunks})
            by_block = [perplexity([c for c in chunks if c["start"] == s], scorer) for s in blocks]
            rows.append((label, cells | {"all": perplexity(chunks, scorer)},
                         sum(r["timings"]["total_s"] for r in results), by_block))
    if not rows:
        return
    names = list(rows[0][1])
    seen = config["tokens_seen"]
    train_s = {p: sum(h["seconds"] for h in config["history"] if h["phase"] == p) for p in seen}
    lines = [f"# LoLCATs: linearised {model_label(a.model)} on PG19", "", f"`{COMMAND}`", "",
             f"Books {', '.join(a.book_ids)}, first {a.tokens} scored tokens each, blocks of Δ={a.delta}; "
             "perplexity = exp(mean NLL) by position of the block, pooled over the books. Trained: "
             + ", ".join(f"{p} {seen[p]:,} tokens in {train_s[p]:.0f} s" for p in seen) + ".", "",
             "| model | " + " | ".join(names) + " | x base, all | scoring wall s |", "|---" * (len(names) + 3) + "|"]
    base = rows[0][1]["all"] if rows[0][0].startswith("base") else None  # absent with --skip reference
    for label, cells, wall, _ in rows:
        ratio = f"{cells['all'] / base:.2f}x" if base else "—"
        lines.append(f"| {label} | " + " | ".join(f"{cells[n]:.2f}" for n in names) + f" | {ratio} | {wall:.0f} |")
    # block by block: where the linear part's sum over every earlier key starts to drown the window
    lines += ["", f"By block of Δ={a.delta} tokens (perplexity pooled over the books):", "",
              "| model | " + " | ".join(f"block {i}" for i in range(len(rows[0][3]))) + " |",
              "|---" * (len(rows[0][3]) + 1) + "|"]
    for label, _, _, by_block in rows:
        lines.append(f"| {label} | " + " | ".join(f"{p:.1f}" for p in by_block) + " |")
    write_text_atomic(Path(a.out) / "lolcats-summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- main

def run(a: argparse.Namespace) -> None:
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    a.ckpt_dir = a.ckpt_dir or str(Path(a.out) / "checkpoints")
    folder = Path(a.ckpt_dir)
    tok = load_tokenizer(Path(a.model), read_json(Path(a.model) / "config.json"))
    books = read_books(a, tok)
    t0 = time.perf_counter()
    if "reference" not in a.skip:
        eval_reference(a, books, device)
    config = read_checkpoint_config(folder) if (folder / "config.json").exists() else None
    if config is not None and config["settings"] != settings(a):
        differ = sorted(k for k in settings(a) if config["settings"].get(k) != settings(a)[k])
        raise ValueError(f"{folder}: a checkpoint made with other settings ({', '.join(differ)}); "
                         "delete it or choose another --ckpt-dir")
    seqs, used = training_sequences(a, tok, (a.transfer_steps + a.lora_steps) * a.batch)
    model = lolcats.build(a.model, device, torch.float32, a.window, a.feature_dim, a.chunk, a.seed)
    if config is not None:
        load_tensors(model, folder / config["weights"])
    for index, run_name in enumerate(("transfer", "lolcats")):
        if index == 1 and a.lora_steps == 0:  # the attention transfer alone
            break
        if config is None or config["phase_index"] <= index:
            config = train_phase(a, index, model, seqs, device)
        elif "eval" not in a.skip and index == 0 and (config["step"] > 0 or config["phase_index"] > 1) and not all(
                (Path(a.out) / f"lolcats-transfer-{b}.json").exists() for b in a.book_ids):
            raise ValueError(f"{folder}: LoRA has started, so the transfer-only model is gone and its books cannot "
                             "be scored; delete the checkpoint or pass --skip eval")
        if "eval" not in a.skip:
            eval_stage(a, run_name, model, config, books)
    write_json(Path(a.out) / "lolcats-train.json",
               {"settings": settings(a), "phases": config["phases"], "tokens_seen": config["tokens_seen"],
                "train_books": used, "wall_s": sum(h["seconds"] for h in config["history"]),
                "history": config["history"], "command": COMMAND})
    report(a, config)
    log(f"done in {time.perf_counter() - t0:.0f} s -> {a.out}")


def main(argv=None) -> int:
    a = parse_args(argv)
    require_model(a.model)  # before anything is loaded or written
    require_books(a.books_dir, "--books-dir", a.book_ids)
    require_books(a.train_books_dir, "--train-books-dir", ())
    try:
        run(a)
    except ValueError as e:  # CheckpointError is a ValueError: bad files, bad settings, a diverged run
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
