"""Blockwise Parallel Transformer (Liu & Abbeel, "Blockwise Parallel Transformer for Large Context Models",
arXiv 2305.19370): the same model, computed one block of tokens at a time, so that training on T tokens
keeps one (T, dim) tensor per layer instead of every activation of every layer.

Here it is Temp-LoRA's adapter step (train_block.block_loss) computed blockwise: the same modules (so the
LoRA wrappers apply unchanged), the same loss, the same gradients, less memory. Symbols: T tokens, query
blocks Q_i of B_q rows, key blocks K_j, V_j of B_kv rows, d = head_dim.

    for each layer:
        K, V = RoPE(wk(attention_norm(x))), wv(attention_norm(x)), block by block   (all later blocks need them)
        for each query block i:
            attention of Q_i over the key blocks j <= i (later ones are wholly masked: skipped), online softmax:
                s_ij = Q_i K_j^T / sqrt(d)                          (causal mask where the blocks overlap)
                m_new = max(m, rowmax s_ij)                         running max
                ℓ = ℓ * exp(m - m_new) + rowsum exp(s_ij - m_new)   running sum, earlier part rescaled
                acc = acc * exp(m - m_new) + exp(s_ij - m_new) V_j  running output, earlier part rescaled
            attn_i = acc / ℓ
            h_i = x_i + wo(attn_i);   out_i = h_i + feed_forward(ffn_norm(h_i))   (this block's rows alone)
    loss: for each block of target rows: output(norm(h)) -> cross-entropy, summed       (blockwise head + loss)
    backward: each layer, and each block inside it, runs under torch.utils.checkpoint: only its inputs
    are kept, the rest is recomputed when backward reaches it.

As in the official code (JAX: every layer under remat saving nothing, and every block inside it too;
B_q = 1024, B_kv = 2048), a layer keeps only its input x (T, dim) until backward reaches it; then it is
recomputed block by block, so its K, V and one block's activations exist at a time. The price is a third
forward (layer recompute, then block recompute) against two for per-layer checkpointing. The official
code still computes the key blocks that the causal mask hides entirely; here they are skipped.

The attention inside a query block has two forms. `online_softmax_attention` is the loop above, written
out for reading and used as the oracle in the tests. `fused_attention` is PyTorch's scaled_dot_product_
attention with a lower-right causal mask: on a GPU the flash kernel, which runs the same online softmax
over on-chip tiles of keys. The fused form is the default: one kernel call per query block instead of
about ten operations per key block issued from Python, and the (heads, B_q, B_kv) scores never reach
memory. Tests check that the two forms, and the model's own attention, agree on awkward sizes.
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from lora import LoRALinear
from model import Transformer, TransformerBlock, apply_rope, rope_cos_sin

LAYER_FORMS = ("blockwise", "checkpointed", "plain")  # BPT, and the two baselines the benchmark compares
LOSS_FORMS = ("blockwise", "full")


# ----------------------------------------------------------------------------- recomputation

def recomputed(module: nn.Module, fn, *args):
    """fn(*args) under torch.utils.checkpoint: only the inputs are kept, and backward runs fn again.

    The second run must draw the adapter dropout masks that the first one drew, or the gradient would
    belong to another function. Checkpoint restores the global random state, but each LoRALinear draws
    from its own generator; so the generators under `module` are saved before the first run and replayed
    for the second (then put back where they were)."""
    generators = list({id(m.generator): m.generator for m in module.modules()
                       if isinstance(m, LoRALinear) and m.generator is not None}.values())

    def contexts():  # called once per checkpointed call, before its forward
        before = [g.get_state() for g in generators]

        @contextmanager
        def replay():
            now = [g.get_state() for g in generators]
            for g, state in zip(generators, before):
                g.set_state(state)
            try:
                yield
            finally:
                for g, state in zip(generators, now):
                    g.set_state(state)
        return nullcontext(), replay()
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


# ----------------------------------------------------------------------------- attention of one query block

def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_block: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, causal, one key block at a time (the reading form).

    q (bs, heads, L, d) are the last L of the S positions whose keys and values k, v (bs, heads, S, d) hold:
    query row r sits at position S - L + r and sees keys 0 .. S - L + r. Keys after the last query are not
    passed in at all, which is how wholly masked key blocks are skipped."""
    bsz, heads, L, d = q.shape
    S = k.shape[2]
    q_pos = torch.arange(S - L, S, device=q.device)                                  # (L,)
    m = torch.full((bsz, heads, L, 1), float("-inf"), device=q.device)              # running max (fp32)
    ell = torch.zeros(bsz, heads, L, 1, device=q.device)                            # ℓ: running sum of exp
    acc = torch.zeros(bsz, heads, L, d, device=q.device)                            # running sum of exp * v
    for j in range(0, S, kv_block):
        k_j, v_j = k[:, :, j: j + kv_block], v[:, :, j: j + kv_block]              # (bs, heads, B_kv, d)
        s = (q @ k_j.transpose(-1, -2)).float() / d ** 0.5                          # (bs, heads, L, B_kv)
        if j + k_j.shape[2] - 1 > S - L:  # the block reaches past the first query: mask what each row cannot see
            k_pos = torch.arange(j, j + k_j.shape[2], device=q.device)
            s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
        # key 0 is in block 0 and visible to every row, so m is finite from the first block on: no NaN
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)                                                    # (bs, heads, L, B_kv)
        rescale = torch.exp(m - m_new)  # earlier blocks' terms were taken against the old max
        ell = ell * rescale + p.sum(-1, keepdim=True)
        acc = acc * rescale + p @ v_j.float()
        m = m_new
    return (acc / ell).to(q.dtype)                                                  # (bs, heads, L, d)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same as online_softmax_attention, by PyTorch's fused kernel (the fast form, the default).
    causal_lower_right aligns the mask to the last query and key, as here (is_causal aligns to the first)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


# ----------------------------------------------------------------------------- one layer, block by block

def keys_values(layer: TransformerBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """K and V of the rows x (bs, B, dim), RoPE applied to K: (bs, n_kv_heads, B, head_dim) each."""
    attn = layer.attention
    bsz, n, _ = x.shape
    xn = layer.attention_norm(x)
    k = attn.wk(xn).view(bsz, n, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.wv(xn).view(bsz, n, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(k, cos, sin), v


def query_block(layer: TransformerBlock, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, kv_block: int, fused: bool) -> torch.Tensor:
    """One query block of one layer: attention, residual, ffn_norm, feed-forward. x (bs, L, dim) are its
    rows, the last L of the S positions whose keys and values k, v (bs, n_kv_heads, S, d) hold."""
    attn = layer.attention
    bsz, L, _ = x.shape
    q = attn.wq(layer.attention_norm(x)).view(bsz, L, attn.n_heads, attn.head_dim).transpose(1, 2)
    q = apply_rope(q, cos, sin)                                                      # (bs, n_heads, L, d)
    # grouped-query attention: query head h reads key/value head h // n_rep, as the model's enable_gqa does
    n_rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)      # (bs, n_heads, S, d)
    out = fused_attention(q, k, v) if fused else online_softmax_attention(q, k, v, kv_block)
    h = x + attn.wo(out.transpose(1, 2).reshape(bsz, L, attn.n_heads * attn.head_dim))
    return h + layer.feed_forward(layer.ffn_norm(h))                                 # (bs, L, dim)


def blockwise_layer(layer: TransformerBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_block: int, kv_block: int, fused: bool) -> torch.Tensor:
    """layer(x) for x (bs, T, dim) at positions 0.., computed one block of B_q rows at a time."""
    T = x.shape[1]
    blocks = [(s, min(s + q_block, T)) for s in range(0, T, q_block)]
    # the rows of each block; split (not x[:, s:e]) so that backward gathers their gradients in one cat
    rows = x.split(q_block, dim=1)                                                   # (bs, <= B_q, dim) each
    # 1. keys and values of every position (each query block needs those of all blocks up to its own)
    k, v = (torch.cat(parts, dim=2) for parts in zip(*[
        recomputed(layer, keys_values, layer, x_i, cos[s:e], sin[s:e]) for x_i, (s, e) in zip(rows, blocks)]))
    # 2. each query block sees the keys up to its own last row: later key blocks are never touched
    out = [recomputed(layer, query_block, layer, x_i, k[:, :, :e], v[:, :, :e], cos[s:e], sin[s:e], kv_block, fused)
           for x_i, (s, e) in zip(rows, blocks)]
    return torch.cat(out, dim=1)                                                     # (bs, T, dim)


# ----------------------------------------------------------------------------- the blockwise loss

def head_nll(model: Transformer, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of rows h (1, n, dim) (last layer's output, before the final norm)."""
    logits = model.output(model.norm(h))[0].float()                                  # (n, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")


def blockwise_nll(model: Transformer, h: torch.Tensor, targets: torch.Tensor, loss_block: int) -> torch.Tensor:
    """head_nll over blocks of loss_block rows: only one block's logits exist at a time, in backward too."""
    return sum(checkpoint(head_nll, model, h[:, s: s + loss_block], targets[s: s + loss_block],
                          use_reentrant=False) for s in range(0, h.shape[1], loss_block))


# ----------------------------------------------------------------------------- the adapter step's loss

def block_loss(model: Transformer, context: list[int], block: list[int], q_block: int = 1024,
               kv_block: int = 2048, loss_block: int = 256, fused: bool = True,
               layers: str = "blockwise", loss: str = "blockwise") -> torch.Tensor:
    """train_block.block_loss, the BPT way: the mean next-token cross-entropy of the block given the
    context, with the same value and gradients; what it keeps is each layer's input and one block at a time.

    B_q = q_block, B_kv = kv_block (the reading form only: the fused kernel tiles the keys itself),
    loss_block rows of logits at a time. `layers` and `loss` pick the baselines the benchmark compares:
    "plain" (the model's own layers, every activation kept), "checkpointed" (the model's own layers, each
    recomputed in backward: the usual per-layer checkpointing), loss "full" (all logits at once)."""
    if layers not in LAYER_FORMS or loss not in LOSS_FORMS:
        raise ValueError(f"layers must be one of {LAYER_FORMS} and loss one of {LOSS_FORMS}, got {layers!r}, {loss!r}")
    if min(q_block, kv_block, loss_block) < 1:
        raise ValueError(f"block sizes must be positive, got B_q={q_block}, B_kv={kv_block}, loss {loss_block}")
    seq = torch.tensor([context + block], device=model.tok_embeddings.weight.device)  # (1, L_T + Δ)
    n_targets = len(block) if context else len(block) - 1  # as train_block.block_loss: no context, no first target
    h = model.tok_embeddings(seq[:, :-1])                                              # (1, T, dim)
    cos, sin = rope_cos_sin(model.args, 0, h.shape[1], h.device)                       # (T, head_dim)
    for layer in model.layers:
        if layers == "blockwise":  # nested: the layer is recomputed in backward, and each block inside it
            h = recomputed(layer, blockwise_layer, layer, h, cos, sin, q_block, kv_block, fused)
        elif layers == "checkpointed":
            h = recomputed(layer, layer, h, cos, sin, 0)
        else:
            h = layer(h, cos, sin, 0)
    # only the block's rows carry a loss; a copy, so the last layer's output for all T rows need not be kept
    h, targets = h[:, -n_targets:].clone(), seq[0, -n_targets:]
    if loss == "blockwise":
        return blockwise_nll(model, h, targets, loss_block) / n_targets
    return head_nll(model, h, targets) / n_targets
