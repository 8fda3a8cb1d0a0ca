"""SUPRA (Mercat et al., "Linearizing Large Language Models", arXiv 2405.06640): turn a pretrained transformer
into an RNN. Softmax attention is replaced by a decaying linear attention that reuses the pretrained W_q, W_k,
W_v, W_o, and the model is uptrained briefly. Its memory of the text is a state of fixed size, so memory and
time per token no longer grow with the text.

Symbols, for one layer and one head h of size d, as in the paper:

    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t       the pretrained projections (the very same nn.Linear objects)
    φ(x) = ReLU(W_φ x + b)                          the feature map (trained): one d x d map for every head
                                                    and for queries and keys alike
    q̃_t = RoPE_t(φ(q_t)),  k̃_t = RoPE_t(φ(k_t)) / √d     RoPE after φ (so the features can be negative)
    γ_h = exp(-slope_h)                             a fixed decay per head, with ALiBi's slopes: a key's weight
                                                    falls by 1/e in 1/slope_h tokens (9 heads: 1.4, 2, 4, ..., 256)
    S_t = γ_h S_{t-1} + k̃_tᵀ v_t,  o_t = q̃_t S_t    the recurrent form: a d x d state per head
    O = ((Q̃ K̃ᵀ) ⊙ D) V,  D_ts = γ_h^(t-s) if s <= t else 0      the parallel form: the same outputs at once
    y_t = W_o GroupNorm(o_t)                        no softmax denominator: a norm over each head instead

Three forms of one layer, equal up to rounding (tests/test_supra.py):
  `parallel`  the formula above, quadratic in length: for reading, and the tests' reference;
  `recurrent` one token at a time: the definition of the state, and what decoding one token runs;
  `chunked`   THE DEFAULT for training and for scoring: the parallel form inside chunks of C tokens and the
              recurrence from chunk to chunk, so memory grows linearly with length (T x C, not T x T), and
              the state after the last token comes out for the next call.

Where the paper's code (TRI-ML/linear_open_lm, `LinearAttn`) leaves room, or where this file differs:
- GQA: the keys and values of a kv head are repeated for each of its query heads, as the official code does.
  The heads of a group cannot share one state: each has its own decay. State: n_layers x n_heads x d x d
  floats (SmolLM2-135M: 30 x 9 x 64 x 64 = 1.1M, 4.4 MB in float32, at any length of text).
- φ: one d x d map shared by all heads, applied head by head. (The official code maps the concatenation of
  all heads at once, a dense (H·d) x (H·d) matrix that mixes heads, and a second one for keys under GQA.)
  W_φ starts as the identity and b as 0 (official: random), so q̃·k̃ starts from the pretrained q·k.
- ALiBi's slopes for any number of heads: the official `get_slopes` crashes when it is not a power of two
  (its recursive call lacks an argument), and SmolLM2 has 9 heads.
- GroupNorm with a per-channel scale and bias (official: none), and, a declared deviation, started from the
  softmax heads' output statistics (`calibrate_group_norm`: per channel, weight = std and bias = mean of the
  softmax attention's output before W_o on a calibration batch). The official norm has no scale: its output
  has unit variance per head, while SmolLM2's softmax heads put out mean squares of 0.00075 (layer 0) to 0.71
  (layer 29), so W_o must first absorb that mismatch before anything else is learned (docs/supra.md: the
  calibration takes the first transfer loss from 14.72 to 6.01).
- The attention arithmetic (from φ's output to the GroupNorm) runs in float32 with autocast off, whatever
  the model's dtype: the state sums thousands of terms.

Beyond the paper, `recipe("supra-transfer")` trains this same SUPRA architecture the way LoLCATs trains its
own: first an attention transfer, where only φ and the GroupNorm train, so that each layer's linear attention
output imitates the layer's softmax attention output (MSE) on the softmax model's own hidden states; then LoRA
on W_q, W_k, W_v, W_o with the next-token loss. It is not LoLCATs, whose architecture differs (Hedgehog
feature maps, a softmax window, a normaliser, no decay): that is methods/lolcats.py.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from load_llama import CheckpointError, load_model
from lora import LoRALinear, add_lora, lora_parameters
from model import Attention, Transformer, apply_rope, rope_cos_sin


# ----------------------------------------------------------------------------- γ_h: ALiBi's slopes

def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's slope per head (Press et al. 2022) for any number of heads; SUPRA's decay is γ_h = exp(-slope_h).

    For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise the largest power
    of two below n, m, gets its sequence, and the n - m heads left take every other slope of the sequence for
    2m (the ones that fall between the first m), in order."""
    if n_heads < 1:
        raise ValueError(f"need at least one head, got {n_heads}")

    def geometric(m: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / m) for i in range(m)]
    m = 2 ** math.floor(math.log2(n_heads))
    return geometric(m) + geometric(2 * m)[0::2][: n_heads - m]


def decay_mask(log_gamma: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """γ_h^distance where distance >= 0, else 0: (n_heads, *distance.shape). log_gamma (n_heads,) = -slope."""
    shape = (-1,) + (1,) * distance.dim()
    # clamp: a negative distance is masked anyway, and γ to a large negative power would overflow
    return torch.exp(log_gamma.view(shape) * distance.clamp(min=0)) * (distance >= 0)


# ----------------------------------------------------------------------------- the three forms
# q, k: (bs, n_heads, T, d) features after φ and RoPE; v: (bs, n_heads, T, dv); log_gamma: (n_heads,);
# state: (bs, n_heads, d, dv), the S before the first of these tokens.

def parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """O = ((Q Kᵀ) ⊙ D) V from an empty state. Memory T x T per head: the form for reading."""
    t = torch.arange(q.shape[-2], device=q.device)
    D = decay_mask(log_gamma, t[:, None] - t[None, :])                  # (n_heads, T, T)
    return ((q @ k.transpose(-1, -2)) * D) @ v                          # (bs, n_heads, T, dv)


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = γ S_{t-1} + k_tᵀ v_t and o_t = q_t S_t, one token at a time. Returns O and the last S."""
    gamma = log_gamma.exp().view(-1, 1, 1)                              # (n_heads, 1, 1)
    out = []
    for t in range(q.shape[-2]):
        state = gamma * state + k[..., t, :, None] * v[..., t, None, :]  # (bs, n_heads, d, dv); k_tᵀv_t outer
        out.append(q[..., t, None, :] @ state)                          # (bs, n_heads, 1, dv)
    return torch.cat(out, dim=-2), state


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, state: torch.Tensor,
            chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The parallel form inside chunks of `chunk` tokens, the recurrence between chunks. Returns O and the
    state after the last token. A last chunk shorter than the others is a second call of its own size."""
    T = q.shape[-2]
    full = T - T % chunk
    outs = []
    for lo, hi in ((0, full), (full, T)):
        if hi > lo:
            o, state = _equal_chunks(q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], log_gamma, state,
                                     min(chunk, hi - lo))
            outs.append(o)
    return torch.cat(outs, dim=-2), state


def _equal_chunks(q, k, v, log_gamma, state, C: int):
    """`chunked` on a length that is a multiple of C: every chunk at once (no loop over chunks)."""
    bs, H, T, d = q.shape
    n = T // C
    q, k, v = (x.reshape(bs, H, n, C, x.shape[-1]) for x in (q, k, v))   # (bs, H, n chunks, C, d)
    i, c = torch.arange(C, device=q.device), torch.arange(n, device=q.device)
    g = log_gamma.view(H, 1, 1, 1)
    # inside a chunk: the parallel form
    D = decay_mask(log_gamma, i[:, None] - i[None, :])[:, None]          # (H, 1, C, C)
    inside = ((q @ k.transpose(-1, -2)) * D) @ v                          # (bs, H, n, C, dv)
    # what chunk c adds to the state by its last token: U_c = Σ_j γ^(C-1-j) k_jᵀ v_j
    added = (k * torch.exp(g * (C - 1 - i).view(C, 1))).transpose(-1, -2) @ v   # (bs, H, n, d, dv)
    # the state before chunk c: γ^(C·c) S_0 + Σ_{c' < c} γ^(C·(c-1-c')) U_c'
    between = decay_mask(log_gamma * C, c[:, None] - 1 - c[None, :])      # (H, n, n)
    before = (torch.einsum("hxy,bhyde->bhxde", between, added)
              + torch.exp(g * C * c.view(n, 1, 1)) * state[:, :, None])   # (bs, H, n, d, dv)
    # from earlier chunks: query i of a chunk reads the state before its chunk, decayed i + 1 steps
    across = (q * torch.exp(g * (i + 1).view(C, 1))) @ before             # (bs, H, n, C, dv)
    last = torch.exp(log_gamma * C).view(H, 1, 1) * before[:, :, -1] + added[:, :, -1]   # (bs, H, d, dv)
    return (inside + across).reshape(bs, H, T, -1), last


# ----------------------------------------------------------------------------- the layer

FORMS = ("chunked", "parallel", "recurrent")


class LinearAttention(nn.Module):
    """SUPRA's attention for one layer: the layer's own wq, wk, wv, wo (the same modules, so LoRA wraps them
    as before) plus φ and the GroupNorm. Called like model.Attention; where that takes the layer's cached
    keys, this takes the layer's state S (see RecurrentState)."""

    def __init__(self, attention: Attention, chunk: int = 128, form: str = "chunked"):
        super().__init__()
        if form not in FORMS or chunk < 1:
            raise ValueError(f"form must be one of {FORMS} and chunk >= 1 (got {form!r}, {chunk})")
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        weight = (self.wo.base if isinstance(self.wo, LoRALinear) else self.wo).weight
        like = dict(device=weight.device, dtype=weight.dtype)
        d = self.head_dim
        self.phi = nn.Linear(d, d, **like)                                 # W_φ, b
        self.group_norm = nn.GroupNorm(self.n_heads, self.n_heads * d, **like)  # per head: its d channels
        with torch.no_grad():
            self.phi.weight.copy_(torch.eye(d))
            self.phi.bias.zero_()
        self.requires_grad_(False)  # as the loaded model: a training phase chooses what trains
        # log γ_h, fixed; float32 (build the model in its dtype before linearize(): .to() would round it)
        self.register_buffer("log_gamma", -torch.tensor(alibi_slopes(self.n_heads), device=weight.device),
                             persistent=False)
        self.chunk, self.form = chunk, form

    def forward(self, x, cos, sin, start_pos: int, cache_k=None, cache_v=None):
        """x (bs, seqlen, dim) -> (bs, seqlen, dim). cache_k: this layer's state S (bs, n_heads, d, d) in
        float32, read as the state before these tokens and overwritten with the state after them; None starts
        from an empty state (training). start_pos only places RoPE: the state has no positions."""
        bsz, seqlen, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = self.wq(x).view(bsz, seqlen, H, d).transpose(1, 2)                        # (bs, n_heads, seqlen, d)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, d).transpose(1, 2)          # (bs, n_kv_heads, seqlen, d)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, d).transpose(1, 2)          # (bs, n_kv_heads, seqlen, d)
        q, k = F.relu(self.phi(q)), F.relu(self.phi(k))                                # φ(x) = ReLU(W_φ x + b)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin) * d ** -0.5            # RoPE after φ
        # GQA: every query head has its own decay, so its own state: repeat each kv head for its query heads
        k, v = (t.repeat_interleave(H // self.n_kv_heads, dim=1) for t in (k, v))      # (bs, n_heads, seqlen, d)
        if cache_k is not None and cache_k.shape != (bsz, H, d, d):
            raise ValueError(f"state of shape {tuple(cache_k.shape)}, expected {(bsz, H, d, d)}: a linearised "
                             "model takes a RecurrentState, not a KVCache")
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            state = cache_k if cache_k is not None else q.new_zeros(bsz, H, d, d)
            if self.form == "parallel":
                if cache_k is not None:
                    raise ValueError("the parallel form starts from an empty state: use chunked or recurrent")
                o = parallel(q, k, v, self.log_gamma)
            elif self.form == "recurrent" or seqlen == 1:  # one new token: one step of the recurrence
                o, state = recurrent(q, k, v, self.log_gamma, state)
            else:
                o, state = chunked(q, k, v, self.log_gamma, state, self.chunk)
            if cache_k is not None:
                cache_k.copy_(state)
            o = o.transpose(1, 2).reshape(bsz * seqlen, H * d)                       # (bs * seqlen, n_heads * d)
            gn = self.group_norm
            o = F.group_norm(o, H, gn.weight.float(), gn.bias.float(), gn.eps)         # no softmax denominator
        return self.wo(o.view(bsz, seqlen, H * d).to(x.dtype))


def linearize(model: Transformer, chunk: int = 128, form: str = "chunked") -> list[Attention]:
    """Put a LinearAttention in place of every layer's softmax attention, reusing the layer's wq, wk, wv, wo.
    Returns the softmax modules it replaced (they share those linears; a LoRA added later wraps the ones in
    the LinearAttention, so the teachers stay the pretrained softmax attention): LoLCATs' attention transfer
    runs them as teachers. Afterwards the model takes a RecurrentState where it took a KVCache."""
    teachers = []
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attention, Attention):
            raise ValueError(f"layer {i}: attention is a {type(layer.attention).__name__}, not softmax Attention "
                             "(linearised already?)")
        teachers.append(layer.attention)
        layer.attention = LinearAttention(layer.attention, chunk, form)
    return teachers


# ----------------------------------------------------------------------------- the state, in place of the KV cache

class RecurrentState:
    """The linearised model's memory of the text: the state S of every layer, (batch, n_heads, d, d) in float32,
    whatever the length of the text.

    It goes where a KVCache goes, `model(tokens, start_pos, state)`: Transformer.hidden_states hands layer i
    `cache.k[i]` (so that is where the states are kept) and LinearAttention overwrites it with the state after
    the new tokens. As with the KV cache, the caller owns it and the position: it holds text[:length], and
    `advance(n)` says that n more tokens were just folded in."""

    def __init__(self, model: Transformer, batch: int = 1):
        a = model.args
        device = next(model.parameters()).device
        self.k = [torch.zeros(batch, a.n_heads, a.head_dim, a.head_dim, device=device) for _ in range(a.n_layers)]
        self.v = [None] * a.n_layers  # nothing: the values are inside S
        self.max_len = math.inf       # no window: any position fits
        self.length = 0

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.k)


@torch.no_grad()
def score_block(model: Transformer, state: RecurrentState, ids: list[int], start: int, end: int) -> float:
    """Summed NLL (nats) of ids[start:end], each token given the whole text before it through the state: the
    protocol's step for a linearised model (no window: nothing is ever dropped, only decayed)."""
    feed = ids[state.length: end - 1]  # tokens not yet in the state, then the block but its last token
    logits = model(torch.tensor([feed], device=state.k[0].device), state.length, state,
                   last=end - start)                                                # (1, end - start, vocab)
    state.advance(len(feed))
    targets = torch.tensor(ids[start:end], device=logits.device)
    return F.cross_entropy(logits[0].float(), targets, reduction="sum").item()


# ----------------------------------------------------------------------------- uptraining: SUPRA, and LoLCATs

@dataclass
class Phase:
    """One stage of training: what trains, on which loss, with which AdamW settings and share of the tokens."""
    name: str                       # names the stage in logs and checkpoints
    loss: str                       # "next_token" or "attention_transfer"
    trains: str                     # "all", "feature_map" (φ and the GroupNorm) or "lora"
    tokens: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    schedule: str                   # "cosine" (lr_at: 10% warm-up, cosine to 10%) or "constant"
    max_grad_norm: float | None     # gradient clipping; None: none


# LoLCATs' LoRA (its configs: rank 8, alpha 16, no dropout, on q, k, v, o), for the supra-transfer recipe
LOLCATS_LORA = dict(rank=8, alpha=16.0, dropout=0.0,
                    targets=("attention.wq", "attention.wk", "attention.wv", "attention.wo"))
# SUPRA's clip (linear_open_lm README: --grad-clip-norm 1). LoLCATs' trainer does not clip, and neither do
# the supra-transfer recipe nor methods/lolcats.py.
MAX_GRAD_NORM = 1.0
ADAM_EPS = 1e-8


def recipe(name: str, tokens: int) -> list[Phase]:
    """The training of each variant, on `tokens` tokens in all."""
    if name == "supra":
        # the linear_open_lm README's linearisation command: every parameter, next-token loss, AdamW lr 3e-4,
        # weight decay 0.1, β2 0.98 (the Mistral-SUPRA model card's 3e-5 with 1000 warm-up steps is a 7B model
        # at 100B tokens; a run of a few hundred steps would never leave that warm-up)
        return [Phase("uptrain", "next_token", "all", tokens, 3e-4, 0.1, (0.9, 0.98), "cosine", MAX_GRAD_NORM)]
    if name == "supra-transfer":  # SUPRA's architecture, LoLCATs' steps: transfer at 1e-2, LoRA at 1e-4, both
        half = tokens // 2        # at a constant lr and unclipped, as LoLCATs' trainer
        return [Phase("transfer", "attention_transfer", "feature_map", half, 1e-2, 0.0, (0.9, 0.999), "constant",
                      None),
                Phase("lora", "next_token", "lora", tokens - half, 1e-4, 0.0, (0.9, 0.999), "constant", None)]
    raise ValueError(f"unknown recipe {name!r} (supra or supra-transfer)")


def phase_parameters(model: Transformer, phase: Phase) -> dict[str, nn.Parameter]:
    """The parameters a phase trains, by name (the names key the checkpoints). Found by module type."""
    if phase.trains == "all":
        chosen = list(model.parameters())
    elif phase.trains == "feature_map":
        chosen = [p for m in model.modules() if isinstance(m, LinearAttention)
                  for p in (*m.phi.parameters(), *m.group_norm.parameters())]
    elif phase.trains == "lora":
        chosen = lora_parameters(model)
    else:
        raise ValueError(f"unknown phase.trains {phase.trains!r}")
    ids = {id(p) for p in chosen}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.1, floor: float = 0.1) -> float:
    """Linear warm-up over the first 10% of the steps (from peak / warm-up steps: never 0), then cosine decay
    to 10% of the peak at the end."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    progress = (step - n_warm) / max(1, steps - n_warm)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model: Transformer, seqs: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of tokens 1.. of each sequence given the ones before: seqs (bs, T + 1)."""
    logits = model(seqs[:, :-1])                                                      # (bs, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), seqs[:, 1:].flatten())


def attention_transfer_loss(model: Transformer, teachers: list[Attention], seqs: torch.Tensor) -> torch.Tensor:
    """LoLCATs' attention transfer: run the softmax model (the teachers) layer by layer; in each layer the
    linear attention reads the same input as the softmax one, and the loss is the mean over layers of the
    MSE between the two outputs. The teachers' outputs flow on, so each layer learns on the inputs it sees in
    the pretrained model, and no gradient crosses from layer to layer."""
    tokens = seqs[:, :-1]
    cos, sin = rope_cos_sin(model.args, 0, tokens.shape[1], tokens.device)
    with torch.no_grad():
        h = model.tok_embeddings(tokens)                                              # (bs, T, dim)
    loss = 0.0
    for layer, teacher in zip(model.layers, teachers):
        with torch.no_grad():
            x = layer.attention_norm(h)
            target = teacher(x, cos, sin, 0)                                          # softmax attention (bs, T, dim)
        loss = loss + F.mse_loss(layer.attention(x, cos, sin, 0).float(), target.float())
        with torch.no_grad():  # TransformerBlock.forward, with the teacher's attention
            h = h + target
            h = h + layer.feed_forward(layer.ffn_norm(h))
    return loss / len(teachers)


def softmax_head_outputs(attention: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """A softmax attention layer's output before W_o, (bs, T, n_heads * d): what the GroupNorm's output stands
    in for."""
    bsz, seqlen, _ = x.shape
    q = attention.wq(x).view(bsz, seqlen, attention.n_heads, attention.head_dim).transpose(1, 2)
    k = attention.wk(x).view(bsz, seqlen, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
    v = attention.wv(x).view(bsz, seqlen, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)     # (bs, n_heads, T, d)
    return out.transpose(1, 2).reshape(bsz, seqlen, -1)


@torch.no_grad()
def calibrate_group_norm(model: Transformer, teachers: list[Attention], seqs: torch.Tensor) -> list[dict]:
    """Start every layer's GroupNorm at the softmax heads' output statistics on `seqs` (bs, T + 1): per channel,
    weight = std and bias = mean over the batch's tokens, so the linear attention's output starts on the scale
    of the output it replaces (a declared deviation from the official code, whose norm has no scale). Runs the
    softmax model, as the attention transfer does. Returns, per layer, the heads' output mean square and the
    smallest and largest channel std."""
    tokens = seqs[:, :-1]
    cos, sin = rope_cos_sin(model.args, 0, tokens.shape[1], tokens.device)
    h = model.tok_embeddings(tokens)                                                  # (bs, T, dim)
    stats = []
    for layer, teacher in zip(model.layers, teachers):
        x = layer.attention_norm(h)
        heads = softmax_head_outputs(teacher, x, cos, sin).flatten(0, 1).float()      # (bs * T, n_heads * d)
        gn = layer.attention.group_norm
        gn.weight.copy_(heads.std(0))
        gn.bias.copy_(heads.mean(0))
        stats.append({"heads_mean_square": heads.pow(2).mean().item(), "std_min": heads.std(0).min().item(),
                      "std_max": heads.std(0).max().item()})
        h = h + teacher.wo(heads.view(*x.shape[:2], -1).to(x.dtype))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return stats


# ----------------------------------------------------------------------------- checkpoints: safetensors + config.json

FORMAT = "templora-linearized/1"


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: Path, model: Transformer, config: dict, names: list[str],
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write the tensors `names` of the model (what training changed), the AdamW moments of the optimizer's
    parameters, and config.json, which names both files. config.json is replaced last, so a crash at any point
    leaves the previous checkpoint whole; files it no longer names are then deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{config['phase']}-{config['step']:06d}"
    params = dict(model.named_parameters())
    config = dict(config, format=FORMAT, trained=sorted(names), weights=f"model-{tag}.safetensors", optimizer=None)
    _write_safetensors({n: params[n] for n in names}, folder / config["weights"])
    if optimizer is not None:
        name_of = {id(p): n for n, p in params.items()}
        moments = {}
        for p, s in optimizer.state.items():
            n = name_of[id(p)]
            moments |= {f"{n}.exp_avg": s["exp_avg"], f"{n}.exp_avg_sq": s["exp_avg_sq"],
                        f"{n}.step": torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)}
        config["optimizer"] = f"optimizer-{tag}.safetensors"
        _write_safetensors(moments, folder / config["optimizer"])
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(tmp, folder / "config.json")
    for f in folder.glob("*.safetensors"):
        if f.name not in (config["weights"], config["optimizer"]):
            f.unlink()


def read_checkpoint_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_tensors(model: Transformer, path: Path) -> None:
    """Copy every tensor of a saved checkpoint file into the model's parameter of that name (shapes checked)."""
    params = dict(model.named_parameters())
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if key not in params:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} (not a parameter of the linearised model)")
            t = f.get_tensor(key)
            if t.shape != params[key].shape:
                raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(params[key].shape)}")
            with torch.no_grad():
                params[key].copy_(t)


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], path: Path) -> None:
    """Put saved AdamW moments back; `names` are the optimizer's parameters' names, in its order."""
    saved = {}
    with safe_open(path, framework="pt") as f:
        for i, n in enumerate(names):
            saved[i] = {"step": f.get_tensor(f"{n}.step").reshape(()), "exp_avg": f.get_tensor(f"{n}.exp_avg"),
                        "exp_avg_sq": f.get_tensor(f"{n}.exp_avg_sq")}
    state = optimizer.state_dict()
    optimizer.load_state_dict({"state": saved, "param_groups": state["param_groups"]})


def build(base_model, device, dtype: torch.dtype, chunk: int, lora: dict | None,
          generator: torch.Generator | None = None) -> tuple[Transformer, list[Attention]]:
    """The pretrained model, linearised, with the recipe's LoRA wrappers if it has any (from the start: a fresh
    adapter is the identity): the skeleton that a checkpoint fills. Returns it and the softmax teachers."""
    model = load_model(base_model, device, dtype)
    teachers = linearize(model, chunk)
    if lora:
        add_lora(model, **lora, generator=generator)
    return model, teachers


def load_linearized(folder, device="cpu", dtype: torch.dtype = torch.bfloat16,
                    base_model=None) -> tuple[Transformer, dict]:
    """A saved linearised model: its base checkpoint (config.json's `base_model`, or `base_model`) loaded,
    linearised and filled with the saved tensors. Returns the model and its config."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    model, _ = build(base_model or config["base_model"], device, dtype, config["chunk"], config["lora"])
    load_tensors(model, folder / config["weights"])
    return model.eval(), config

