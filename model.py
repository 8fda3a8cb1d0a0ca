"""Llama 3 in one file: RMSNorm, RoPE (plain, or stretched: PI, Llama 3.1's llama3, YaRN, LongRoPE), grouped-query
attention, SwiGLU, a KV cache owned by the caller, and generate().

Module and weight names follow Meta's reference `model.py` (wq wk wv wo, w1 w2 w3, attention_norm,
ffn_norm) so the two can be read side by side. Unlike Meta's, `forward` is not under
`torch.inference_mode()`: the Temp-LoRA adapter step back-propagates through this same forward.
"""
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096                # width of the residual stream
    n_layers: int = 32
    n_heads: int = 32              # query heads
    n_kv_heads: int = 8            # key/value heads, shared by n_heads // n_kv_heads query heads (GQA)
    head_dim: int = 128            # usually dim // n_heads, but a checkpoint may say otherwise
    hidden_dim: int = 14336        # width of the SwiGLU feed-forward
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE
    tie_embeddings: bool = False   # the output head reuses the token embedding matrix
    max_seq_len: int = 8192        # longest position the checkpoint was trained for


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 even for a bf16 model, then scale in the model's dtype (as Meta and HF do)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


# ----------------------------------------------------------------------------- RoPE
#
# Channel pair i (i = 0 .. head_dim/2 - 1) turns at frequency θ_i = rope_theta^(-2i/head_dim): pair 0 turns
# fastest. A model trained on L tokens has seen every angle of the fast pairs but only part of a turn of the
# slow ones. To read L·s tokens, each frequency is divided by a factor λ_i (its "divisor"), and cos and sin
# may be multiplied by an attention factor. Each rope type below is a rule for the λ_i:
#   linear    (PI)      λ_i = s for every pair: positions squeezed back into the trained range
#   llama3    (Llama 3.1) λ_i = 1 for short wavelengths, s for long ones, blended between
#   yarn      (YaRN)    the same idea with a ramp in the pair index, plus the attention factor 0.1·ln s + 1
#   longrope  (LongRoPE, DCIS) an explicit λ_i per pair, e.g. found by a search (methods/dcis.py)
# NTK-aware scaling is not a rope type: it changes the base, rope_theta -> rope_theta · s^(d/(d-2)) (d =
# head_dim), which leaves pair 0 alone and divides the slowest pair by exactly s. Give it as rope_theta.
# transformers' "dynamic" type is left out: its frequencies change with the sequence length, so keys already
# in a KV cache would have been rotated differently from the new ones.

def linear_rope(inv_freq: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """Position interpolation (PI, Chen et al. 2023): every frequency divided by `factor`."""
    return torch.full_like(inv_freq, float(scaling["factor"])), 1.0


def llama3_rope(inv_freq: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """Llama 3.1's "llama3" scaling: long wavelengths (beyond the original context) are slowed down by
    `factor`, short ones are kept, and the band between is blended. No attention factor."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # smooth = 1 keeps a frequency, smooth = 0 divides it by `factor`, clamped to [0, 1] in between
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return 1.0 / (smooth + (1.0 - smooth) / factor), 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor √(1/t) = 0.1·ln(s) + 1 (scaled by `mscale`), 1 when not stretched."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rope(inv_freq: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023), as transformers computes it. Pair i turns r_i = L·θ_i / 2π times over the
    original length L. Pairs up to the index where r = β_fast (32) keep their frequency, pairs from the
    index where r = β_slow (1) are divided by `factor`, and λ ramps linearly in the pair index between
    (the two indices rounded outwards unless truncate is false). cos and sin get yarn_mscale(factor), or
    mscale / mscale_all_dim's ratio (DeepSeek), or the config's attention_factor."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    # log r_i falls linearly with i (θ_i is geometric), so the (fractional) index where r_i = R is
    # (log r_0 - log R) / (log r_0 - log r_1): transformers' find_correction_dim, from the frequencies alone
    log_r = torch.log(old_len * inv_freq.double() / (2 * math.pi))
    index_where = lambda r: ((log_r[0] - math.log(r)) / (log_r[0] - log_r[1])).item()  # noqa: E731
    low, high = index_where(beta_fast), index_where(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, 2 * len(inv_freq) - 1)
    if low == high:
        high += 0.001  # (transformers' guard against a zero-width ramp)
    interpolated = ((torch.arange(len(inv_freq), dtype=torch.float32, device=inv_freq.device) - low)
                    / (high - low)).clamp(0.0, 1.0)                  # 0: keep θ_i, 1: θ_i / factor
    divisors = 1.0 / (1.0 - interpolated + interpolated / factor)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    return divisors, float(attention_factor)


def longrope_rope(inv_freq: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """LongRoPE (Ding et al. 2024; Phi-3's "longrope"): an explicit λ_i per pair, searched rather than
    derived. The config holds two sets, `long_factor` and `short_factor`.

    One set per loaded model, never switched mid-sequence: long_factor when the config stretches the
    window (factor = max_position_embeddings / original_max_position_embeddings > 1, which the loader
    fills in when absent), short_factor otherwise. transformers instead picks by the current sequence
    length, so a KV cache filled before the text crossed the original length holds keys rotated with the
    short factors while later queries use the long ones (tests/test_rope.py shows both). Attention factor:
    the config's, else √(1 + ln(factor) / ln(original length)) as transformers computes it."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    name = "long_factor" if factor > 1 else "short_factor"
    divisors = torch.tensor(scaling[name], dtype=torch.float32, device=inv_freq.device)
    if divisors.shape != inv_freq.shape:
        raise ValueError(f"longrope {name} has {divisors.numel()} entries, expected head_dim/2 = {len(inv_freq)}")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(old_len)) if factor > 1 else 1.0
    return divisors, float(attention_factor)


class RopeType(NamedTuple):
    keys: tuple[str, ...]      # config keys it needs: a config without one is refused by the loader
    divisors: Callable         # (inv_freq, scaling) -> (per-pair divisors λ_i, attention factor on cos and sin)
    optional: tuple[str, ...] = ()  # config keys it reads when present


# The RoPE types a config may name (transformers' `rope_type`). Both the model and the loader's validation
# read this one table; a new scaling is one entry.
ROPE_TYPES = {
    "linear": RopeType(("factor",), linear_rope),
    "llama3": RopeType(("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                       llama3_rope),
    "yarn": RopeType(("factor", "original_max_position_embeddings"), yarn_rope,
                     ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": RopeType(("factor", "long_factor", "short_factor", "original_max_position_embeddings"),
                         longrope_rope, ("attention_factor",)),
}


def rope_inv_freq(args: ModelArgs, device=None) -> tuple[torch.Tensor, float]:
    """The rotation speed of each pair of channels, (head_dim // 2,) in float32, and the attention factor
    that multiplies cos and sin (1 unless the rope type has one)."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float32, device=device) / args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    if args.rope_scaling is None:
        return inv_freq, 1.0
    kind = args.rope_scaling["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)} or none)")
    divisors, attention_factor = ROPE_TYPES[kind].divisors(inv_freq, args.rope_scaling)
    if not (torch.isfinite(divisors).all() and (divisors > 0).all() and attention_factor > 0):
        raise ValueError(f"rope_type {kind!r} with {args.rope_scaling} gives divisors or an attention factor "
                         "that are not positive and finite")
    return inv_freq / divisors, attention_factor


def rope_cos_sin(args: ModelArgs, start_pos: int, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotation angle for positions start_pos .. start_pos+seqlen-1, (seqlen, head_dim)."""
    positions = torch.arange(start_pos, start_pos + seqlen, dtype=torch.float32, device=device)
    inv_freq, attention_factor = rope_inv_freq(args, device)
    angles = torch.outer(positions, inv_freq)                      # (seqlen, head_dim // 2)
    angles = torch.cat((angles, angles), dim=-1)                   # (seqlen, head_dim)
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # "Rotate-half" layout: channel i is paired with channel i + head_dim/2 (not with i+1 as in Meta's
    # complex-number code). Hugging Face checkpoints store wq/wk for this layout, so they load as they are.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of every layer, pre-allocated for `max_len` positions.

    The caller owns it and the position: `model(tokens, start_pos, cache)` writes the new keys and
    values at start_pos.. and attends to everything before. Nothing inside the model advances it."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len


# ----------------------------------------------------------------------------- the transformer

class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k, v stay separate linears: LoRA wraps each of them by name
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, start_pos: int, cache_k=None, cache_v=None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)     # (bs, n_heads, seqlen, head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (bs, n_kv_heads, seqlen, head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (bs, n_kv_heads, seqlen, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache_k is not None:
            end = start_pos + seqlen
            cache_k[:, :, start_pos:end] = k
            cache_v[:, :, start_pos:end] = v
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]                              # (bs, n_kv_heads, end, head_dim)
        n_keys = k.shape[2]
        if seqlen == 1:  # one new token sees every key: no mask
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif n_keys == seqlen:  # keys are exactly these tokens: is_causal lets the kernel skip the masked half
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # new tokens after cached ones: query i sees keys 0 .. (n_keys - seqlen) + i
            mask = torch.ones(seqlen, n_keys, dtype=torch.bool, device=x.device).tril(diagonal=n_keys - seqlen)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)  # (bs, seqlen, n_heads * head_dim)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate (HF: gate_proj)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down (HF: down_proj)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up   (HF: up_proj)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos, cache_k=None, cache_v=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, cache_k, cache_v)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one tensor, two uses

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                last: int | None = None) -> torch.Tensor:
        """tokens (bs, seqlen) at positions start_pos.. -> logits (bs, seqlen, vocab_size).

        With `cache`, keys/values are written there at start_pos and earlier cached ones are attended to;
        without it the sequence is processed alone, causally (the training path; start_pos must be 0
        unless you mean to shift positions). `last=n` computes logits for the last n positions only:
        the output head is the largest matmul of a small model, and a loss on a suffix needs no more."""
        h = self.tok_embeddings(tokens)                                                   # (bs, seqlen, dim)
        return self.output(self.hidden_states(h, start_pos, cache, last))                 # (bs, seqlen or last, vocab)

    def hidden_states(self, h: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                      last: int | None = None, layer_forward: Callable | None = None) -> torch.Tensor:
        """Input embeddings h (bs, seqlen, dim) -> final hidden states after the last norm (bs, seqlen or
        last, dim), i.e. everything but the token lookup and the output head. The seam for methods that
        feed vectors that are not token embeddings (memory tokens) or apply the head themselves (a
        blockwise loss). `layer_forward(layer, h, cos, sin)`, without a cache only: runs each layer in its
        place, the same values computed another way (train_block: lean_backward.lean_block, less memory)."""
        bsz, seqlen, _ = h.shape
        if cache is not None and start_pos + seqlen > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; cannot write {seqlen} at {start_pos}")
        cos, sin = rope_cos_sin(self.args, start_pos, seqlen, h.device)                    # (seqlen, head_dim)
        for i, layer in enumerate(self.layers):
            if cache is None and layer_forward is not None:
                h = layer_forward(layer, h, cos, sin)
            elif cache is None:
                h = layer(h, cos, sin, start_pos)
            else:
                h = layer(h, cos, sin, start_pos, cache.k[i], cache.v[i])
        if last is not None:
            h = h[:, -last:]  # note: slicing before the norm and head saves their cost on unused positions
        return self.norm(h)                                                               # (bs, seqlen or last, dim)


# ----------------------------------------------------------------------------- generation

def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits (vocab,): greedy when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # keep the smallest set of tokens whose mass reaches top_p (the first token is always kept)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def generate(model: Transformer, cache: KVCache, pending: list[int], start_pos: int, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: tuple[int, ...] = (),
             generator: torch.Generator | None = None, n_vocab: int | None = None, on_token=None) -> list[int]:
    """Feed `pending` (tokens not yet in the cache) at start_pos, then sample up to max_new_tokens.

    Returns the new tokens, stopping after a stop token. On return the cache holds every position
    up to, but not including, the last new token: it is the next call's `pending`.
    `n_vocab`: sample only ids below it, the tokenizer's vocabulary (a checkpoint may pad its embedding
    matrix past it; those rows are no tokens). `on_token(id)` is called on each new token as it comes."""
    device = cache.k[0].device
    new: list[int] = []
    pos = start_pos
    tokens = torch.tensor([pending], device=device)
    for _ in range(max_new_tokens):
        logits = model(tokens, pos, cache, last=1)  # (1, 1, vocab)
        if not torch.isfinite(logits).all():  # argmax would still pick a token: garbage, reported as text
            raise ValueError(f"generate: the logits at position {pos + tokens.shape[1] - 1} are not finite")
        pos += tokens.shape[1]
        next_id = sample(logits[0, -1, :n_vocab], temperature, top_p, generator)  # (n_vocab,): padded ids never
        new.append(next_id)
        if on_token:
            on_token(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.tensor([[next_id]], device=device)
    return new
