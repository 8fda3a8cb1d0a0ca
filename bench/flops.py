"""FLOPs of what `templora.evaluate` runs, counted from the model config (ModelArgs), not measured.

Matmul FLOPs only (a multiply-add is 2 FLOPs); norms, RoPE, softmax, SiLU, the loss and the optimizer
step are O(dim) per token and left out. `FlopCounter` sees every forward call of the model (a hook),
takes its sizes (new tokens, cache position, logits rows) and applies the formulas below.
"""
import inspect
from dataclasses import replace

import torch

from lora import DEFAULT_TARGETS, LoRALinear
from model import ModelArgs


def linear_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear in one block, by its path inside the block (the LoRA target names)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    return {"attention.wq": (args.dim, q), "attention.wk": (args.dim, kv), "attention.wv": (args.dim, kv),
            "attention.wo": (q, args.dim), "feed_forward.w1": (args.dim, args.hidden_dim),
            "feed_forward.w3": (args.dim, args.hidden_dim), "feed_forward.w2": (args.hidden_dim, args.dim)}


def forward_flops(args: ModelArgs, tokens: int, keys: int, logits: int, lora_rank: int = 0) -> dict[str, float]:
    """One forward over `tokens` new tokens that attend to `keys` keys in all (summed over the tokens),
    with the output head applied to `logits` rows (the model's `last=`) and a LoRA of `lora_rank` (0: off)."""
    shapes = linear_shapes(args)
    return {
        # forward matmul FLOPs per token = 2 x (non-embedding linear params): every weight is one multiply-add
        "linear": 2 * args.n_layers * sum(i * o for i, o in shapes.values()) * tokens,
        # the head (dim x vocab, tied or not) is a linear too, but runs only on the `last` rows
        "head": 2 * args.dim * args.vocab_size * logits,
        # scores q.k and the weighted sum of v: 2 matmuls x 2 FLOPs x head_dim per (query head, key) pair;
        # with GQA every query head still does its own products, so n_heads (not n_kv_heads) counts
        "attention": 4 * args.n_layers * args.n_heads * args.head_dim * keys,
        # x A^T (in -> r) then (.) B^T (r -> out), on each wrapped linear
        "lora": 2 * lora_rank * args.n_layers * sum(i + o for p, (i, o) in shapes.items() if p in DEFAULT_TARGETS)
                * tokens,
    }


def causal_pairs(T: int) -> int:
    """(query, key) pairs of causal attention over T tokens: query i sees keys 0..i."""
    return T * (T + 1) // 2


def prefill_flops(args: ModelArgs, T: int) -> float:
    """Forward of T tokens into an empty cache, logits of the last position only."""
    return sum(forward_flops(args, T, causal_pairs(T), logits=1).values())


def step_flops(args: ModelArgs, T: int, n_loss: int, rank: int) -> float:
    """One adapter step on a T-token window with the loss (and so the head) on its last n_loss tokens."""
    return train_step_flops(forward_flops(args, T, causal_pairs(T), logits=n_loss, lora_rank=rank))


def train_step_flops(fwd: dict[str, float]) -> float:
    """Forward + backward of one adapter step, given its forward's FLOPs.

    Backward through the frozen base linears and head computes input gradients only (dX = dY W, the same
    matmul size as the forward: 1x) and no weight gradients, because the base is frozen. Attention has no
    weights but its backward needs dQ, dK, dV and dP: 4 matmuls where the forward had 2 (2x). LoRA needs
    weight gradients for A and B and the input gradients through them (2x). So
        fwd + bwd = 2 x (linear + head) + 3 x (attention + lora)
    rather than the usual 3x forward of full fine-tuning. (Layer 0's q/k/v input gradients are not needed
    and autograd skips them: a ~1/n_layers saving on those three, ignored.)"""
    return 2 * (fwd["linear"] + fwd["head"]) + 3 * (fwd["attention"] + fwd["lora"])


class FlopCounter:
    """Adds up the FLOPs of every forward the model runs, by phase:
    score_base (no adapter, or adapter switched off), score_templora (adapter on, no grad) and
    train (grad on: a forward then its backward, counted with train_step_flops)."""

    PHASES = ("score_base", "score_templora", "train")

    def __init__(self, model: torch.nn.Module):
        self.model, self.args = model, model.args
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._taken = dict(self.totals)
        self._signature = inspect.signature(model.forward)  # (tokens, start_pos, cache, last)
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, model, args, kwargs):
        call = self._signature.bind(*args, **kwargs)
        call.apply_defaults()
        tokens, start, cache, last = (call.arguments[k] for k in ("tokens", "start_pos", "cache", "last"))
        batch, n = tokens.shape
        past = start if cache is not None else 0  # without a cache the sequence only sees itself
        keys = batch * (n * past + causal_pairs(n))  # new token i attends to keys 0 .. past + i
        wrappers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        rank = wrappers[0].lora_a.shape[0] if wrappers and wrappers[0].enabled else 0
        fwd = forward_flops(self.args, batch * n, keys, batch * (last or n), rank)
        if torch.is_grad_enabled():
            self.totals["train"] += train_step_flops(fwd)
        else:
            self.totals["score_templora" if rank else "score_base"] += sum(fwd.values())

    def take(self) -> dict[str, float]:
        """FLOPs by phase since the previous take()."""
        new = {k: self.totals[k] - self._taken[k] for k in self.PHASES}
        self._taken = dict(self.totals)
        return new

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def uio_flops(args: ModelArgs, tokens: int, memory_positions: int, memories: int, rank: int,
              encode: bool) -> dict[str, float]:
    """One block of UIO-LLMs scoring (methods/uio.py's Reader): the decoder reads `tokens` tokens after
    `memory_positions` memory keys (the base model, head on every row); then, if `encode`, the encoder reads the
    same tokens + `memories` memory tokens through all layers but the last (LoRA r on wq, wv) and the decoder's
    wk, wv (+ LoRA r) turn the memory rows of every layer into keys and values."""
    decode = forward_flops(args, tokens, tokens * memory_positions + causal_pairs(tokens), logits=tokens)
    if not encode:
        return {"decode": sum(decode.values()), "encode": 0.0}
    n, shapes = tokens + memories, linear_shapes(args)
    encoder_args = replace(args, n_layers=args.n_layers - 1)  # the last layer's output is never read
    encoder = sum(forward_flops(encoder_args, n, causal_pairs(n), logits=0).values())
    encoder += 2 * rank * encoder_args.n_layers * n * sum(i + o for p, (i, o) in shapes.items()
                                                          if p in ("attention.wq", "attention.wv"))
    kv = sum(2 * memories * args.n_layers * (i * o + rank * (i + o)) for p, (i, o) in shapes.items()
             if p in ("attention.wk", "attention.wv"))
    return {"decode": sum(decode.values()), "encode": encoder + kv}
