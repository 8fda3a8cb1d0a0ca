"""SUPRA on PG19: linearise the model, uptrain it two ways on the same tokens (SUPRA's recipe; SUPRA's architecture
trained LoLCATs-style: attention transfer then LoRA), score the held-out books with the recurrent state carried
over the whole text (no window), and measure decode time and memory against text length: the RNN's state vs the
base model's KV cache. (LoLCATs itself, its own architecture: bench/lolcats.py.)

    python -m bench.supra --quick --model TINY --books-dir D --book-ids 1 --train-books-dir T --out O   # seconds, CPU
    python -m bench.supra --device cuda --model DIR --books-dir DIR --train-books-dir DIR --out DIR     # ~7 min, H100

What it does, in order; every result is written atomically when done, and a rerun skips what is done (a result
or checkpoint made with other settings is an error, never mixed in):
  reference   the base model with a window of --base-window tokens (protocol.Window): supra-base-w<W>-<book>.json
  per variant (--variants):
    train     linearise; start each GroupNorm at the softmax heads' output statistics on the first training batch
              (--calibration softmax, the default; none: the official start, weight 1 and bias 0); run the
              recipe's phases on --train-tokens tokens of --train-books-dir; a checkpoint (safetensors +
              config.json) every --save-every steps: <ckpt-dir>/<variant>/, supra-train-<variant>.json
    eval      the checkpoint reloaded; every block scored with the state of all text before it:
              supra-<variant>-<book>.json
  decode      --new-tokens greedy tokens after prompts of --prompt-lengths tokens: ms per token and peak GPU memory,
              the first variant (state) vs the base model (KV cache): supra-decode.json
  report      supra-summary.md and supra.png (perplexity by position; decode time and memory by prompt length)

Precision: training keeps float32 master weights under bf16 autocast on CUDA (float32 on CPU); evaluation and
decoding load bf16 weights on CUDA. The linear attention itself always runs in float32.
"""
import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import EVAL_BOOKS, MODEL_DIR, RESULTS, TRAIN_BOOKS, model_label, require_books, require_model, stored
from load_llama import load_model, load_tokenizer, read_json
from methods.supra import (ADAM_EPS, LOLCATS_LORA, RecurrentState, attention_transfer_loss, build,
                           calibrate_group_norm, load_linearized, load_optimizer_state, load_tensors, lr_at,
                           next_token_loss, phase_parameters, read_checkpoint_config, recipe, save_checkpoint,
                           score_block)
from model import KVCache, generate
from protocol import evaluate_blocks, perplexity, position_buckets, write_text_atomic
from templora import TempLoRAConfig, evaluate
from train_block import make_optimizer

COMMAND = "python -m bench.supra " + shlex.join(sys.argv[1:])
VARIANTS = ("supra", "supra-transfer")
LABELS = {"supra": "SUPRA (all weights, next-token loss)",
          "supra-transfer": "SUPRA arch., LoLCATs-style transfer, then LoRA"}
CALIBRATIONS = ("softmax", "none")
BUCKETS = position_buckets((0, 4096, 8192, 16384, 32768))
# full: the replication's books and blocks; ~7 minutes on one H100 (docs/supra.md: the budget)
SIZES = {
    "full": dict(tokens=32768, delta=1024, base_window=2048, base_keep=1024, train_tokens=2_000_000, seq_len=2048,
                 batch=4, save_every=100, chunk=128, train_minutes=2.0, prompt_lengths="1024,4096,16384,65536",
                 new_tokens=256, prefill_block=4096),
    "quick": dict(tokens=192, delta=64, base_window=128, base_keep=64, train_tokens=1024, seq_len=64, batch=2,
                  save_every=3, chunk=16, train_minutes=1.0, prompt_lengths="32,128", new_tokens=8, prefill_block=48),
}


def log(msg: str) -> None:
    print(f"[supra] {msg}", flush=True)


def write_json(path: Path, data: dict) -> None:
    """protocol's atomic write, not its strict JSON: these logs may hold NaN (a skipped step's gradient norm)."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--books-dir", default=str(EVAL_BOOKS), help="evaluation books (never trained on)")
    p.add_argument("--book-ids", default="349,718,1684,2021", help="comma-separated evaluation book ids (file stems)")
    p.add_argument("--train-books-dir", default=str(TRAIN_BOOKS),
                   help="training text: *.txt, read in order of name until the token budget is met")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes {SIZES['quick']}")
    helps = {"tokens": "scored tokens per book (the text is cut to tokens + 1)", "delta": "Δ: tokens per block",
             "base_window": "W of the base model's reference row", "base_keep": "L_x of the reference row",
             "train_tokens": "training tokens per variant (supra-transfer: half attention transfer, half LoRA)",
             "seq_len": "training sequence length", "batch": "sequences per optimizer step",
             "save_every": "checkpoint every N steps (and at the end of each phase)",
             "chunk": "C: chunk length of the chunked form", "train_minutes": "wall-clock cap per variant "
             "(shared by its phases in proportion to their tokens): a phase that reaches it stops, saves and is "
             "marked stopped_early", "prompt_lengths": "decode: comma-separated prompt lengths",
             "new_tokens": "decode: greedy tokens generated after each prompt",
             "prefill_block": "decode: prompt tokens fed per forward"}
    for key, value in SIZES["full"].items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                       help=f"{helps[key]} (full {value}, quick {SIZES['quick'][key]})")
    p.add_argument("--calibration", default="softmax", choices=CALIBRATIONS,
                   help="the GroupNorm's start: the softmax heads' per-channel std and mean on the first training "
                   "batch (softmax, a declared deviation from the official code), or weight 1, bias 0 (none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="order of the training sequences, LoRA init")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip", default="", help="comma-separated stages to leave out: reference, eval, decode")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--ckpt-dir", default=None, help="checkpoints (default: <out>/checkpoints)")
    a = p.parse_args(argv)
    for key, value in SIZES["quick" if a.quick else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    a.book_ids = [b.strip() for b in a.book_ids.split(",") if b.strip()]
    a.prompt_lengths = [int(x) for x in a.prompt_lengths.split(",") if x.strip()]
    a.skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    problems = [f"--variants: unknown {v!r}" for v in a.variants if v not in VARIANTS]
    problems += [f"--skip: unknown stage {s!r}" for s in a.skip - {"reference", "eval", "decode"}]
    if min(a.tokens, a.delta, a.train_tokens, a.seq_len, a.batch, a.save_every, a.chunk, a.new_tokens,
           a.prefill_block) < 1 or a.train_minutes <= 0 or not a.book_ids:
        problems.append("sizes, --train-minutes and --book-ids must be positive / non-empty")
    if any(n < 2 for n in a.prompt_lengths) or not a.prompt_lengths:
        problems.append("--prompt-lengths must be at least 2 tokens each")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {a.device}: CUDA is not available")
    if problems:
        p.error("; ".join(problems))
    return a


# ----------------------------------------------------------------------------- text

def read_books(a: argparse.Namespace, tok) -> dict[str, list[int]]:
    """The evaluation books' ids, BOS first, cut to --tokens + 1."""
    books = {}
    for b in a.book_ids:
        path = Path(a.books_dir) / f"{b}.txt"
        if not path.is_file():
            raise ValueError(f"--books-dir: {path} not found")
        ids = tok.encode(path.read_text(encoding="utf-8"), bos=tok.bos_id is not None)
        if len(ids) < a.tokens + 1:
            raise ValueError(f"--books-dir: book {b} has {len(ids)} tokens, fewer than --tokens {a.tokens} + 1")
        books[b] = ids[: a.tokens + 1]
    return books


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_sequences(a: argparse.Namespace, tok, n_seqs: int) -> tuple[torch.Tensor, list[str]]:
    """n_seqs sequences of --seq-len + 1 tokens: the training books (BOS before each) in order of name, cut
    into consecutive pieces, then shuffled with --seed. Refuses any file that is an evaluation book."""
    folder = Path(a.train_books_dir)
    files = sorted(folder.glob("*.txt"), key=lambda f: (len(f.stem), f.stem))
    if not files:
        raise ValueError(f"--train-books-dir {folder}: no *.txt files")
    evaluation = {f.stem: f for f in Path(a.books_dir).glob("*.txt")}
    eval_hashes = {sha256(f) for f in evaluation.values()}
    for f in files:
        if f.stem in evaluation or sha256(f) in eval_hashes:
            raise ValueError(f"--train-books-dir: {f} is an evaluation book (in --books-dir {a.books_dir}); "
                             "never train on the books that are scored")
    need = n_seqs * (a.seq_len + 1)
    stream, used = [], []
    for f in files:
        stream += tok.encode(f.read_text(encoding="utf-8"), bos=tok.bos_id is not None)
        used.append(f.name)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"--train-books-dir {folder}: {len(stream)} tokens in all, the budget needs {need}")
    seqs = torch.tensor(stream[:need]).view(n_seqs, a.seq_len + 1)
    return seqs[torch.randperm(n_seqs, generator=torch.Generator().manual_seed(a.seed))], used


# ----------------------------------------------------------------------------- train

def train_settings(a: argparse.Namespace, variant: str) -> dict:
    """What a checkpoint must have been made with to be resumed or used."""
    return {"recipe": variant, "base_model": str(Path(a.model).resolve()), "train_tokens": a.train_tokens,
            "seq_len": a.seq_len, "batch": a.batch, "chunk": a.chunk, "seed": a.seed,
            "train_books_dir": str(Path(a.train_books_dir).resolve()), "calibration": a.calibration}


def train(a: argparse.Namespace, variant: str, tok, device: torch.device) -> dict:
    """Linearise and uptrain one variant; returns the final checkpoint's config. Resumes from the last
    checkpoint of the same settings."""
    folder = Path(a.ckpt_dir) / variant
    settings = train_settings(a, variant)
    phases = recipe(variant, a.train_tokens)
    steps = [max(1, p.tokens // (a.batch * a.seq_len)) for p in phases]
    lora = LOLCATS_LORA if any(p.trains == "lora" for p in phases) else None
    start_phase, start_step, history, config = 0, 0, [], None
    if (folder / "config.json").exists():
        config = read_checkpoint_config(folder)
        if config["settings"] != settings:
            differ = sorted(k for k in settings if config["settings"].get(k) != settings[k])
            raise ValueError(f"{folder}: a checkpoint made with other settings ({', '.join(differ)}); "
                             "delete it or choose another --ckpt-dir")
        if config["done"]:
            log(f"{variant}: trained already ({config['tokens_seen']} tokens) in {folder}")
            return config
        start_phase, start_step, history = config["phase_index"], config["step"], config["history"]
        log(f"{variant}: resuming at phase {phases[start_phase].name}, step {start_step}")

    seqs, used = training_sequences(a, tok, sum(steps) * a.batch)
    generator = torch.Generator(device=device).manual_seed(a.seed)
    model, teachers = build(a.model, device, torch.float32, a.chunk, lora, generator)  # float32 master weights
    if config is not None:
        load_tensors(model, folder / config["weights"])
    elif a.calibration == "softmax":  # a fresh start: the GroupNorm begins on the softmax output's scale
        stats = calibrate_group_norm(model, teachers, seqs[: a.batch].to(device))
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "calibration.json", {"tokens": a.batch * a.seq_len, "layers": stats})
        log(f"{variant}: GroupNorm calibrated on {a.batch} x {a.seq_len} tokens; softmax heads' mean square "
            f"{min(s['heads_mean_square'] for s in stats):.2g}..{max(s['heads_mean_square'] for s in stats):.2g}")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    total_tokens = sum(p.tokens for p in phases)
    trained_names: list[str] = []
    for index, phase in enumerate(phases):
        params = phase_parameters(model, phase)
        trained_names = sorted(set(trained_names) | set(params))
        first_seq = sum(steps[:index]) * a.batch  # each phase reads its own sequences
        if index < start_phase:
            continue
        model.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        optimizer = make_optimizer(list(params.values()), phase.lr, phase.weight_decay, phase.betas, ADAM_EPS)
        first = start_step if index == start_phase else 0
        if first > 0:
            load_optimizer_state(optimizer, list(params), folder / config["optimizer"])
        cap = 60 * a.train_minutes * phase.tokens / total_tokens
        t0, stopped_early = time.perf_counter(), False
        model.train()
        log(f"{variant}/{phase.name}: steps {first}..{steps[index]} of {a.batch} x {a.seq_len} tokens, "
            f"trains {sum(p.numel() for p in params.values()):,} parameters ({phase.trains}), lr {phase.lr:g}")
        for step in range(first, steps[index]):
            tic = time.perf_counter()
            lo = first_seq + step * a.batch
            batch = seqs[lo: lo + a.batch].to(device)
            lr = lr_at(step, steps[index], phase.lr) if phase.schedule == "cosine" else phase.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(**autocast):
                loss = (next_token_loss(model, batch) if phase.loss == "next_token"
                        else attention_transfer_loss(model, teachers, batch))
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), phase.max_grad_norm or math.inf)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                raise ValueError(f"{variant}/{phase.name} step {step}: loss {loss.item()}, grad norm "
                                 f"{grad_norm.item()}: not finite, training stopped")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"phase": phase.name, "step": step, "loss": loss.item(), "lr": lr,
                            "grad_norm": grad_norm.item(), "seconds": time.perf_counter() - tic})
            elapsed = time.perf_counter() - t0
            stopped_early = elapsed > cap and step + 1 < steps[index]
            done = step + 1 == steps[index] or stopped_early
            if (step + 1) % 10 == 0 or done:
                log(f"{variant}/{phase.name} step {step + 1}/{steps[index]}: loss {loss.item():.4f}, lr {lr:.2e}, "
                    f"{(step + 1 - first) * a.batch * a.seq_len / elapsed:,.0f} tokens/s")
            if (step + 1) % a.save_every == 0 or done:
                config = checkpoint(folder, model, optimizer, params, trained_names, settings, phases, steps, lora,
                                    index, step + 1, history, used, done=done and index == len(phases) - 1)
            if stopped_early:
                log(f"{variant}/{phase.name}: stopped early at the {cap:.0f} s cap after {step + 1} steps")
                break
        model.eval()
        if stopped_early and index + 1 < len(phases):  # the next phase starts from a checkpoint of this one
            config = checkpoint(folder, model, None, params, trained_names, settings, phases, steps, lora,
                                index + 1, 0, history, used, done=False)
    return config


def checkpoint(folder, model, optimizer, params, trained_names, settings, phases, steps, lora, index, step,
               history, used, done) -> dict:
    """Save the linearised model's trained tensors, the optimizer state and config.json (which reloads it)."""
    seen = {p.name: sum(1 for h in history if h["phase"] == p.name) for p in phases}
    tokens_seen = sum(seen.values()) * settings["batch"] * settings["seq_len"]
    config = {"base_model": settings["base_model"], "chunk": settings["chunk"], "lora": lora,
              "phases": [asdict(p) | {"steps": n, "steps_done": seen[p.name]} for p, n in zip(phases, steps)],
              "phase": phases[min(index, len(phases) - 1)].name, "phase_index": index, "step": step,
              "tokens_seen": tokens_seen, "train_books": used, "done": done, "settings": settings,
              "history": history}
    # at a phase boundary (index past the phase that trained) there is no optimizer state to resume
    save_checkpoint(folder, model, config, trained_names, optimizer if step > 0 else None)
    return read_checkpoint_config(folder)


# ----------------------------------------------------------------------------- evaluate

def settings_of(a: argparse.Namespace, book: str, run: str, extra: dict) -> dict:
    return {"run": run, "book": book, "text_tokens": a.tokens + 1, "delta": a.delta, "device": a.device,
            "dtype": eval_dtype_name(a), "model": str(Path(a.model).resolve())} | extra


def eval_dtype_name(a: argparse.Namespace) -> str:
    return "bfloat16" if a.device.startswith("cuda") else "float32"


def progress(label: str):
    def show(chunks, done, total, elapsed):
        if len(chunks) % 8 == 0 or done == total:
            name = next(k for k in chunks[0] if k.startswith("nll_"))[4:]
            log(f"  {label}: {done}/{total} tokens, ppl {perplexity(chunks, name):.3f}, {done / elapsed:,.0f} tok/s")
    return show


def eval_reference(a: argparse.Namespace, books: dict, device: torch.device, dtype: torch.dtype) -> None:
    """The base model with its ordinary attention over a sliding window of W tokens (templora.evaluate without
    the adapter): the row the linearised models are compared with, computed in the same run."""
    run = f"base-w{a.base_window}"
    cfg = TempLoRAConfig(delta=a.delta, window=a.base_window, keep=a.base_keep, templora=False)
    todo = {b: ids for b, ids in books.items()
            if stored(Path(a.out) / f"supra-{run}-{b}.json", settings_of(a, b, run, {"window": a.base_window})) is None}
    if not todo:
        return
    model = load_model(a.model, device, dtype)
    for b, ids in todo.items():
        log(f"reference: base W={a.base_window}, book {b}")
        r = evaluate(model, ids, cfg, progress=progress(f"base W={a.base_window} {b}"))
        r |= settings_of(a, b, run, {"window": a.base_window}) | {"command": COMMAND,
                                                                    "model_label": model_label(a.model)}
        write_json(Path(a.out) / f"supra-{run}-{b}.json", r)


def eval_variant(a: argparse.Namespace, variant: str, train_config: dict, books: dict, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Each block scored with the state of the whole text before it: the checkpoint reloaded from disk."""
    extra = {"train": train_settings(a, variant), "tokens_seen": train_config["tokens_seen"]}
    todo = {b: ids for b, ids in books.items()
            if stored(Path(a.out) / f"supra-{variant}-{b}.json", settings_of(a, b, variant, extra)) is None}
    if not todo:
        return
    folder = Path(a.ckpt_dir) / variant
    model, config = load_linearized(folder, device, dtype, base_model=a.model)
    for b, ids in todo.items():
        log(f"eval: {variant}, book {b}, no window")
        state = RecurrentState(model)

        def step(i: int, start: int, end: int) -> dict:  # the protocol's step: the state holds all text before
            return {f"nll_{variant}": score_block(model, state, ids, start, end)}
        r = evaluate_blocks(ids, a.delta, step, progress(f"{variant} {b}"))
        phases = [{k: p[k] for k in ("name", "trains", "tokens", "lr", "steps", "steps_done")}
                  for p in config["phases"]]
        r |= settings_of(a, b, variant, extra) | {
            "config": {"recipe": variant, "label": LABELS[variant], "chunk": config["chunk"], "lora": config["lora"],
                       "phases": phases, "window": None, "checkpoint": str(folder)},
            "state_bytes": state.nbytes(), "command": COMMAND, "model_label": model_label(a.model)}
        write_json(Path(a.out) / f"supra-{variant}-{b}.json", r)


# ----------------------------------------------------------------------------- decode speed and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_run(model, kind: str, prompt: list[int], new_tokens: int, block: int, device: torch.device) -> dict:
    """Feed the prompt (all but its last token, `block` tokens per forward), then generate `new_tokens`
    greedily with model.generate: the time per new token and the peak memory while decoding."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else None
    n = len(prompt)
    if kind == "kv":
        memory = KVCache(model.args, 1, n + new_tokens, device, next(model.parameters()).dtype)
        memory_bytes = sum(t.numel() * t.element_size() for t in memory.k + memory.v)
    else:
        memory = RecurrentState(model)
        memory_bytes = memory.nbytes()
    sync(device)
    t0 = time.perf_counter()
    for pos in range(0, n - 1, block):
        model(torch.tensor([prompt[pos: min(pos + block, n - 1)]], device=device), pos, memory, last=1)
    sync(device)
    prefill_s = time.perf_counter() - t0
    prefill_peak = torch.cuda.max_memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    new = generate(model, memory, [prompt[-1]], n - 1, new_tokens)
    sync(device)
    decode_s = time.perf_counter() - t0
    mib = lambda x: None if x is None else x / 2 ** 20  # noqa: E731
    return {"prompt_tokens": n, "new_tokens": len(new), "prefill_s": prefill_s, "decode_s": decode_s,
            "ms_per_token": 1000 * decode_s / len(new), "memory_mib": mib(memory_bytes),
            "weights_mib": mib(before),
            "decode_peak_mib": mib(torch.cuda.max_memory_allocated(device) if cuda else None),
            "prefill_peak_mib": mib(prefill_peak), "first_new_tokens": new[:8]}


def decode(a: argparse.Namespace, tok, device: torch.device, dtype: torch.dtype) -> None:
    path = Path(a.out) / "supra-decode.json"
    variant = a.variants[0]
    wanted = {"device": a.device, "dtype": eval_dtype_name(a), "model": str(Path(a.model).resolve()),
              "linear": train_settings(a, variant), "new_tokens": a.new_tokens, "prefill_block": a.prefill_block}
    result = stored(path, wanted) or wanted | {"runs": {}}
    # prompts: the first evaluation book, as long as the longest prompt asks (not cut to --tokens)
    first = Path(a.books_dir) / f"{a.book_ids[0]}.txt"
    text = tok.encode(first.read_text(encoding="utf-8"), bos=tok.bos_id is not None)
    if len(text) < max(a.prompt_lengths):
        raise ValueError(f"--prompt-lengths: book {a.book_ids[0]} has {len(text)} tokens, fewer than "
                         f"{max(a.prompt_lengths)}")
    for kind in ("kv", "linear"):
        todo = [n for n in a.prompt_lengths if f"{kind}_{n}" not in result["runs"]]
        if not todo:
            continue
        model = (load_model(a.model, device, dtype) if kind == "kv"
                 else load_linearized(Path(a.ckpt_dir) / variant, device, dtype, base_model=a.model)[0])
        decode_run(model, kind, text[:16], 4, a.prefill_block, device)  # warm-up: kernels, allocator
        for n in todo:
            r = decode_run(model, kind, text[:n], a.new_tokens, a.prefill_block, device)
            result["runs"][f"{kind}_{n}"] = r
            write_json(path, result | {"command": COMMAND, "note": "kv: the base model with a KV cache of the "
                                       "whole prompt (past max_position_embeddings the text is garbage, the cost "
                                       f"is real); linear: the {variant} checkpoint with its recurrent state"})
            peak = f", peak {r['decode_peak_mib']:.0f} MiB" if r["decode_peak_mib"] is not None else ""
            log(f"decode {kind}: prompt {n}: {r['ms_per_token']:.2f} ms/token, cache/state "
                f"{r['memory_mib']:.1f} MiB{peak}")
        del model


# ----------------------------------------------------------------------------- report

def rows(a: argparse.Namespace) -> list[tuple[str, str, list[dict]]]:
    """(label, scorer, results per book) of every row that has results."""
    out = []
    for run, scorer, label in [(f"base-w{a.base_window}", "base", f"base, W={a.base_window}"),
                               *((v, v, LABELS[v] + ", no window") for v in a.variants)]:
        paths = [Path(a.out) / f"supra-{run}-{b}.json" for b in a.book_ids]
        results = [json.loads(p.read_text()) for p in paths if p.exists()]
        if results:
            out.append((label, scorer, results))
    return out


def by_position(results: list[dict], scorer: str) -> dict[str, float]:
    chunks = [c for r in results for c in r["chunks"]]
    cells = {name: perplexity([c for c in chunks if lo <= c["start"] < hi], scorer)
             for lo, hi, name in BUCKETS if any(lo <= c["start"] < hi for c in chunks)}
    return cells | {"all": perplexity(chunks, scorer)}


def report(a: argparse.Namespace) -> None:
    table = rows(a)
    if not table:
        return
    cells = [(label, by_position(results, scorer), results) for label, scorer, results in table]
    names = list(cells[0][1])
    lines = [f"# SUPRA: linearised {model_label(a.model)} on PG19", "", f"`{COMMAND}`", "",
             f"Books {', '.join(a.book_ids)}, first {a.tokens} scored tokens each, blocks of Δ={a.delta}; "
             "perplexity = exp(mean NLL) by position of the block, pooled over the books.", "",
             "| model | " + " | ".join(names) + " | vs base, all | tokens trained |", "|---" * (len(names) + 3) + "|"]
    ref = cells[0][1]
    for label, c, results in cells:
        seen = results[0].get("tokens_seen")
        lines.append(f"| {label} | " + " | ".join(f"{c[n]:.2f}" for n in names) +
                     f" | {100 * (c['all'] / ref['all'] - 1):+.1f}% | {seen if seen is not None else '—'} |")
    lines.append("")
    for label, c, _ in cells[1:]:
        first, last = names[0], names[-2]  # the first and the last position bucket (names[-1] is "all")
        gap0, gap1 = 100 * (c[first] / ref[first] - 1), 100 * (c[last] / ref[last] - 1)
        trend = ("one position bucket only" if first == last else
                 f"the gap {'narrows' if abs(gap1) < abs(gap0) else 'widens'} with position")
        lines.append(f"- {label}: {gap0:+.1f}% vs base at {first}, {gap1:+.1f}% at {last}: {trend}.")
    decode_path = Path(a.out) / "supra-decode.json"
    runs = json.loads(decode_path.read_text())["runs"] if decode_path.exists() else {}
    if runs:
        lines += ["", "| decode | prompt tokens | ms / new token | cache or state MiB | peak MiB while decoding |",
                  "|---|---|---|---|---|"]
        for key, r in runs.items():
            peak = f"{r['decode_peak_mib']:.0f}" if r["decode_peak_mib"] is not None else "—"
            lines.append(f"| {'KV cache (base)' if key.startswith('kv') else 'state (linearised)'} | "
                         f"{r['prompt_tokens']} | {r['ms_per_token']:.2f} | {r['memory_mib']:.2f} | {peak} |")
    (Path(a.out) / "supra-summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    plot(a, cells, runs)


def plot(a: argparse.Namespace, cells, runs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, c, _ in cells:
        axes[0].plot([n for n in c if n != "all"], [v for n, v in c.items() if n != "all"], "o-", label=label)
    axes[0].set(xlabel="position of the block in the book (tokens)", ylabel="perplexity (exp mean NLL)",
                title=f"books {', '.join(a.book_ids)}")
    axes[0].legend(fontsize=7)
    for kind, name in (("kv", "KV cache (base)"), ("linear", "state (linearised)")):
        pts = sorted((r["prompt_tokens"], r) for k, r in runs.items() if k.startswith(kind))
        if pts:
            axes[1].plot([n for n, _ in pts], [r["ms_per_token"] for _, r in pts], "o-", label=name)
            if pts[0][1]["decode_peak_mib"] is not None:
                axes[2].plot([n for n, _ in pts], [r["decode_peak_mib"] for _, r in pts], "o-", label=name)
    axes[1].set(xscale="log", xlabel="prompt length (tokens)", ylabel="ms per new token", title="decode time")
    axes[2].set(xscale="log", xlabel="prompt length (tokens)", ylabel="peak GPU MiB while decoding",
                title="decode memory (torch.cuda.max_memory_allocated)")
    for ax in axes[1:]:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(Path(a.out) / "supra.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def run(a: argparse.Namespace) -> None:
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.threads:
        torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    a.ckpt_dir = a.ckpt_dir or str(Path(a.out) / "checkpoints")
    model_dir = Path(a.model)
    if not model_dir.is_dir():
        raise ValueError(f"--model {model_dir}: checkpoint directory not found")
    tok = load_tokenizer(model_dir, read_json(model_dir / "config.json"))
    books = read_books(a, tok)
    t0 = time.perf_counter()
    if "reference" not in a.skip:
        eval_reference(a, books, device, dtype)
    for variant in a.variants:
        config = train(a, variant, tok, device)
        history = config["history"]
        write_json(Path(a.out) / f"supra-train-{variant}.json",
                   {"variant": variant, "label": LABELS[variant], "settings": config["settings"],
                    "phases": config["phases"], "tokens_seen": config["tokens_seen"],
                    "train_books": config["train_books"],
                    "calibration": (json.loads((Path(a.ckpt_dir) / variant / "calibration.json").read_text())
                                    if (Path(a.ckpt_dir) / variant / "calibration.json").exists() else None),
                    "wall_s": sum(h["seconds"] for h in history), "history": history, "command": COMMAND})
        if "eval" not in a.skip:
            eval_variant(a, variant, config, books, device, dtype)
    if "decode" not in a.skip:
        decode(a, tok, device, dtype)
    report(a)
    log(f"done in {time.perf_counter() - t0:.0f} s -> {a.out}")


def main(argv=None) -> int:
    a = parse_args(argv)
    require_model(a.model)  # before anything is loaded or written
    if {"reference", "eval", "decode"} - a.skip:  # the stages that read the evaluation books
        require_books(a.books_dir, "--books-dir", a.book_ids)
    if a.variants:  # uptraining reads the training books
        require_books(a.train_books_dir, "--train-books-dir", ())
    try:
        run(a)
    except ValueError as e:  # CheckpointError is a ValueError: bad files, bad settings, a diverged run
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
