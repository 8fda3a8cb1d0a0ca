"""Temp-LoRA (arXiv 2401.11504): while a long text is generated (or scored), a temporary LoRA is trained
on the text so far, block by block, so distant context lives in the adapter's weights instead of the
KV cache. At the end the adapter is discarded: the base model is exactly what was loaded.

This file is the algorithm: the knobs (`TempLoRAConfig`), generation (`generate_templora`, Algorithm 1 of
the paper) and the evaluation protocol (`eval_block` on every block = `evaluate`). The command line, its
flag checks and the demos are in cli.py; `python templora.py ...` hands its arguments there:

    python templora.py demo --tiny                                  # the mechanics on a random model, seconds
    python templora.py demo                                         # Temp-LoRA on a real model, ~3 minutes
    python templora.py eval --model DIR --text BOOK.txt --out results.json
"""
import math
import time
from dataclasses import asdict, dataclass

import torch

from lora import add_lora, lora_disabled, lora_parameters, lora_targets, remove_lora
from model import Transformer, generate
from protocol import Window, evaluate_blocks, score_block
from train_block import block_loss, make_optimizer, train_block


@dataclass
class TempLoRAConfig:
    delta: int = 1024          # Δ: tokens generated (or scored) per block; the adapter trains on each block
    context: int = 3072        # L_T: tokens before a block that its training step sees (no loss on them)
    window: int = 4096         # W: KV cache length; a block that would overflow it triggers a recompute
    keep: int = 2048           # L_x: tokens re-encoded into the cache by a recompute
    rank: int = 64             # LoRA rank r
    alpha: float | None = None  # LoRA scale is alpha / rank; None: alpha = rank, so the scale stays 1
    targets: str = "all"       # the linears that carry the adapter: all, attn, mlp, or "attention.wq,attention.wv"
    dropout: float = 0.05      # LoRA dropout, during training only
    lr: float = 5e-5           # AdamW learning rate, constant after the warm-up
    warmup_blocks: int = 2     # lr ramps lr/2, lr, lr, ... (never 0: the first block trains too)
    epochs: int = 2            # optimizer steps per block
    weight_decay: float = 0.0
    cache_reuse: bool = True   # keep K/V computed by older adapters (the paper's cache reuse)
    templora: bool = True      # False: the base model alone, with the same window
    seed: int = 0


def lora_alpha(cfg: TempLoRAConfig) -> float:
    return float(cfg.rank) if cfg.alpha is None else cfg.alpha


def config_record(cfg: TempLoRAConfig, base_window: int | None = None) -> dict:
    """The knobs as a result file records them: α resolved, the base model's window."""
    return asdict(cfg) | {"alpha": lora_alpha(cfg), "base_window": base_window or cfg.window}


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
    if cfg.templora and not 0 < lora_alpha(cfg) < math.inf:
        problems.append(f"--alpha must be positive and finite, got {cfg.alpha}")
    if cfg.templora and (cfg.epochs < 1 or not cfg.lr > 0):
        problems.append(f"--epochs must be >= 1 and --lr > 0 (got {cfg.epochs}, {cfg.lr})")
    if cfg.templora:
        try:
            lora_targets(cfg.targets, model)
        except ValueError as e:
            problems.append(f"--targets {cfg.targets}: {e}")
    if problems:
        raise ValueError("; ".join(problems))


def add_adapter(model: Transformer, cfg: TempLoRAConfig) -> list:
    """A fresh adapter on cfg.targets; its init and dropout draw from their own seeded stream."""
    rng = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    return add_lora(model, cfg.rank, lora_alpha(cfg), cfg.dropout, lora_targets(cfg.targets, model), generator=rng)


def lr_at(block: int, cfg: TempLoRAConfig) -> float:
    # a linear warm-up that starts at lr / warmup_blocks, not at 0 (a zero first step wastes block 0)
    return cfg.lr * min(1.0, (block + 1) / max(1, cfg.warmup_blocks))


def format_losses(losses: list) -> str:
    """'3.436 -> 3.305'; a skipped step (None in results, NaN from train_block) shows as 'skipped'."""
    return " -> ".join("skipped" if x is None or math.isnan(x) else f"{x:.3f}" for x in losses)


# ----------------------------------------------------------------------------- generate

def generate_templora(model: Transformer, prompt: list[int], max_new_tokens: int, cfg: TempLoRAConfig,
                      temperature: float = 0.0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
                      log=print, n_vocab: int | None = None, on_token=None, loss_fn=block_loss) -> list[int]:
    """Algorithm 1 of the paper: generate a block, train the adapter on it, reuse the cache, repeat;
    discard the adapter at the end. Returns the generated tokens. `n_vocab` and `on_token` go to
    model.generate (sample only the tokenizer's ids; see each token as it comes, e.g. to keep them on Ctrl-C).
    `loss_fn(model, context, block)` is the adapter step's loss (train_block.block_loss, or one that computes
    the same value another way, e.g. methods/bpt.py's blockwise one)."""
    check_config(cfg, model)
    if not prompt:
        raise ValueError("the prompt is empty (and the tokenizer has no BOS token to start from)")
    sampler = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)  # picks the tokens
    text = list(prompt)
    window = Window(model, cfg.window, cfg.keep)
    wrappers = add_adapter(model, cfg) if cfg.templora else []
    try:
        optimizer = make_optimizer(lora_parameters(model), cfg.lr, cfg.weight_decay) if cfg.templora else None
        block = 0
        while len(text) - len(prompt) < max_new_tokens:
            n = min(cfg.delta, max_new_tokens - (len(text) - len(prompt)))
            if window.make_room(len(text), n):
                log(f"[block {block}] recompute: the cache re-encodes the last {len(text) - window.start} tokens "
                    f"with the current adapter")
            elif window.length > 0:
                log(f"[block {block}] reuse: the cache keeps the K/V of {window.length} tokens from earlier adapters")
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
                losses = train_block(model, optimizer, context, new, lr_at(block, cfg), cfg.epochs, loss_fn=loss_fn)
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
               lora_win: Window | None, optimizer, lr: float, cfg: TempLoRAConfig, loss_fn=block_loss) -> dict:
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
        out["recomputed"] = lora_win.recomputes > recomputes  # the cache was rebuilt for this block
        out["seconds"]["score_templora"] = time.perf_counter() - tic
        tic = time.perf_counter()
        context = ids[max(0, start - cfg.context): start]
        losses = train_block(model, optimizer, context, ids[start:end], lr, cfg.epochs, loss_fn=loss_fn)
        out["train_context"] = len(context)
        out["train_loss"] = [x if math.isfinite(x) else None for x in losses]  # None: a skipped step (no NaN in JSON)
        if not cfg.cache_reuse:
            lora_win.invalidate()
        out["seconds"]["train"] = time.perf_counter() - tic
    return out


def evaluate(model: Transformer, ids: list[int], cfg: TempLoRAConfig, base_window: int | None = None,
             progress=None, extras=None, loss_fn=block_loss) -> dict:
    """Score every block of Δ tokens with the base model and with the adapter trained on all earlier
    blocks, then train on the block (protocol.evaluate_blocks). Token 0 is context only; tokens 1.. are
    scored. With cfg.templora False only the base model is scored (no adapter, no training).
    `extras()`, if given, is called after each block and its dict is kept in that block (e.g. FLOPs)."""
    check_config(cfg, model, base_window)
    # the base model may get its own (e.g. longer) window; its L_x scales with it
    base_size = base_window or cfg.window
    base_win = Window(model, base_size, min(cfg.keep * base_size // cfg.window, base_size - cfg.delta))
    lora_win = Window(model, cfg.window, cfg.keep) if cfg.templora else None
    wrappers = add_adapter(model, cfg) if cfg.templora else []
    try:
        params = lora_parameters(model)
        optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay) if cfg.templora else None

        def step(block: int, start: int, end: int) -> dict:
            out = eval_block(model, ids, start, end, base_win, lora_win, optimizer, lr_at(block, cfg), cfg, loss_fn)
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
        "adapter_parameters": sum(p.numel() for p in params),
        "config": config_record(cfg, base_size),
        "timings": seconds | result["timings"],
    }


if __name__ == "__main__":
    import sys

    from cli import main
    sys.exit(main())
