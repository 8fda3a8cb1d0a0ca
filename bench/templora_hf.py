"""The Temp-LoRA eval block written with transformers + peft: the stack of the official code
(TemporaryLoRA/Temp-LoRA, trainer/acc_pg19_trainer.py), as the baseline of bench/speed.py. Dev dependencies.

Per block, as the official trainer does it (no KV cache is kept between blocks):
  1. score the block with the base model: `disable_adapter()`, one full forward of context + block,
     labels = -100 on the context (transformers computes logits for every position);
  2. score it the same way with the adapter on;
  3. train the adapter on the same context + block: `epochs` steps of forward with labels, backward,
     clip to 1.0, AdamW (betas 0.9/0.999, eps 1e-7, as the official `create_optimizer`).

Left out on purpose, each of which would only slow the baseline down: accelerate/deepspeed wrapping,
the all-ones attention_mask, `enable_input_require_grads()` (needed only for gradient checkpointing),
and the official's second scoring pass over an eval copy of the data.
"""
import torch
from torch import nn

# every linear of every block, not lm_head (the official `find_all_linear_names` on a Llama)
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def add_peft_lora(hf_model: nn.Module, rank: int = 64, alpha: float = 64.0, dropout: float = 0.05) -> nn.Module:
    """Wrap a LlamaForCausalLM in a peft LoRA (peft's defaults otherwise: the adapter is kept in float32
    beside a bf16 base, as lora.py does). Modifies hf_model in place; `.unload()` gives it back."""
    from peft import LoraConfig, TaskType, get_peft_model
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=LLAMA_LINEARS)
    return get_peft_model(hf_model, config)


def make_optimizer_hf(peft_model: nn.Module, lr: float = 5e-5, weight_decay: float = 0.0) -> torch.optim.AdamW:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=weight_decay)


def _inputs(ids: list[int], start: int, end: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids = up to `context` tokens before `start` + ids[start:end]; labels = -100 on the context."""
    first = max(0, start - context)
    seq = torch.tensor([ids[first:end]])  # (1, context + block)
    labels = seq.clone()
    labels[:, : start - first] = -100
    if first == start:  # no context: transformers cannot predict the first token, as in block_loss
        labels[:, 0] = -100
    return seq, labels


@torch.no_grad()
def score_hf(model: nn.Module, ids: list[int], start: int, end: int, context: int) -> float:
    """Summed NLL (nats) of ids[start:end] given up to `context` tokens before it: one full forward."""
    seq, labels = _inputs(ids, start, end, context)
    model.eval()
    loss = model(input_ids=seq, labels=labels).loss  # mean over the scored tokens
    return loss.item() * int((labels[:, 1:] != -100).sum())


def train_hf(model: nn.Module, optimizer: torch.optim.Optimizer, ids: list[int], start: int, end: int,
             context: int, lr: float, epochs: int = 2, max_grad_norm: float = 1.0) -> list[float]:
    """`epochs` adapter steps on ids[start:end], with up to `context` tokens before it and no loss on them."""
    seq, labels = _inputs(ids, start, end, context)
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    model.train()  # LoRA dropout on
    try:
        for _ in range(epochs):
            loss = model(input_ids=seq, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        model.eval()
    return losses


def eval_block_hf(model: nn.Module, optimizer: torch.optim.Optimizer, ids: list[int], start: int, end: int,
                  context: int, lr: float, epochs: int = 2) -> dict:
    """One Temp-LoRA eval block: score with the base model, score with the adapter, train on the block."""
    with model.disable_adapter():
        nll_base = score_hf(model, ids, start, end, context)
    nll_templora = score_hf(model, ids, start, end, context)
    losses = train_hf(model, optimizer, ids, start, end, context, lr, epochs)
    return {"start": start, "tokens": end - start, "nll_base": nll_base, "nll_templora": nll_templora,
            "train_loss": losses}
