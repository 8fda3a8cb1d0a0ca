"""One Temp-LoRA update: train the adapter on one block of text, seeing the tokens before it as context.

    input  = [ L_T context tokens | Δ block tokens ]
    loss   =   (none)             | next-token cross-entropy
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def make_optimizer(params, lr: float = 5e-5, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7) -> torch.optim.AdamW:
    """AdamW over `params` (for Temp-LoRA: lora_parameters(model), the adapter only), with the official
    code's settings. It lives as long as the adapter: its moments carry over from block to block."""
    if isinstance(params, nn.Module):
        raise TypeError("make_optimizer takes the parameters to train, e.g. lora_parameters(model), not a model")
    params = list(params)
    if not params:
        raise ValueError("no parameters to train (for an adapter: call add_lora() first)")
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def block_loss(model: nn.Module, context: list[int], block: list[int]) -> torch.Tensor:
    """Mean next-token cross-entropy over the block's tokens, given the context before it."""
    seq = torch.tensor([context + block], device=next(model.parameters()).device)  # (1, L_T + Δ)
    # every block token is a target; the first is predicted from the last context token, so with
    # no context at all (the text's first block) the first block token cannot be scored
    n_targets = len(block) if context else len(block) - 1
    logits = model(seq[:, :-1], last=n_targets)                   # (1, n_targets, vocab)
    targets = seq[0, -n_targets:]                                  # (n_targets,)
    return F.cross_entropy(logits[0].float(), targets)


def train_block(model: nn.Module, optimizer: torch.optim.Optimizer, context: list[int], block: list[int],
                lr: float, epochs: int = 2, max_grad_norm: float = 1.0, loss_fn=block_loss) -> list[float]:
    """`epochs` optimizer steps on one block; returns the loss of each (NaN where a step was skipped).

    A non-finite loss or gradient skips that step: it is reported in the returned list, never applied.
    `loss_fn(model, context, block)` computes the loss: block_loss, or one that computes the same value
    another way (methods/bpt.py: blockwise, for less memory)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    model.train()  # turns on the adapter's dropout; the base model has no train-time behaviour
    try:
        for _ in range(epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, context, block)
            if not torch.isfinite(loss):
                losses.append(math.nan)
                continue
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                losses.append(math.nan)
                continue
            optimizer.step()
            losses.append(loss.item())
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    return losses
