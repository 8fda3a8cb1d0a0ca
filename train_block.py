"""One Temp-LoRA update: train the adapter on one block of text, seeing the tokens before it as context.

    input  = [ L_T context tokens | Δ block tokens ]
    loss   =   (none)             | next-token cross-entropy
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from lean_backward import lean_block

HEAD_ELEMENTS = 2 ** 24  # logits computed at a time by the lean loss: 64 MB in fp32

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


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits h W^T (W the frozen output head), a few rows at a time, with its
    gradient computed in the forward: the (n, vocab) logits are never whole and nothing of them is kept.
    Per row, d loss / d logits = (softmax(logits) - onehot(target)) / n, so d loss / d h = that @ W."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows: int):              # h (n, dim), weight (vocab, dim), targets (n,)
        n = h.shape[0]
        total = torch.zeros((), device=h.device)
        dh = torch.empty_like(h)
        for s in range(0, n, rows):
            logits = F.linear(h[s:s + rows], weight).float()       # (rows, vocab), as model.output(h).float()
            t = targets[s:s + rows]
            lse = logits.logsumexp(-1)                            # (rows,)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            p = logits.sub_(lse[:, None]).exp_()                   # softmax, in the logits' own memory
            p[torch.arange(len(t), device=t.device), t] -= 1.0
            dh[s:s + rows] = p.div_(n).to(h.dtype) @ weight
        ctx.save_for_backward(dh)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return dh * grad.to(dh.dtype), None, None, None


def block_loss(model: nn.Module, context: list[int], block: list[int], lean: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the block's tokens, given the context before it.

    lean (the default): the same value through a backward that keeps less, each layer by
    lean_backward.lean_block and the head by HeadLoss, rows at a time; the gradients equal the plain
    form's up to the order of floating-point sums. lean=False: the model's forward under autograd as it
    is, the form to read."""
    seq = torch.tensor([context + block], device=next(model.parameters()).device)  # (1, L_T + Δ)
    # every block token is a target; the first is predicted from the last context token, so with
    # no context at all (the text's first block) the first block token cannot be scored
    n_targets = len(block) if context else len(block) - 1
    targets = seq[0, -n_targets:]                                  # (n_targets,)
    head = model.output
    if not (lean and type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad):
        logits = model(seq[:, :-1], last=n_targets)               # (1, n_targets, vocab)
        return F.cross_entropy(logits[0].float(), targets)
    h = model.hidden_states(model.tok_embeddings(seq[:, :-1]), last=n_targets, layer_forward=lean_block)
    rows = max(1, HEAD_ELEMENTS // head.weight.shape[0])
    return HeadLoss.apply(h[0], head.weight, targets, rows)       # h (n_targets, dim)


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
