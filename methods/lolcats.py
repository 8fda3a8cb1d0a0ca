"""LoLCATs (Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models", arXiv 2410.10254;
HazyResearch/lolcats): turn a pretrained transformer into a linear-attention model in two cheap steps. Each
layer's softmax attention becomes a Hedgehog linear attention beside a short softmax sliding window, reusing the
pretrained W_q, W_k, W_v, W_o. First "attention transfer": only the feature maps train, so that each layer's
output imitates the softmax attention's. Then "low-rank linearizing": LoRA on W_q, W_k, W_v, W_o with the
next-token loss.

Symbols, for one layer and one head h of size d, as in the paper and its code:

    q_t, k_t = RoPE_t(W_q x_t), RoPE_t(W_k x_t),  v_t = W_v x_t   the pretrained projections and RoPE, exactly as
                                                  softmax attention computes them (RoPE before the feature map)
    φ_q(q) = [softmax(q W_q^h), softmax(-q W_q^h)]   Hedgehog's feature map: W_q^h (d x f) for this head alone,
    φ_k(k) = [softmax(k W_k^h), softmax(-k W_k^h)]   f = 64, so 2f features; keys have a map of their own
    ω_h = σ(α_h)                                  the window's weight, trained (starts at 0.1, as the official w01)
    the window (the last w = 64 keys, t - w < s <= t):   a_ts = ω_h exp(q_t·k_s / √d - m_t)
    the linear part (every earlier key, s <= t - w):      a_ts = φ_q(q_t)·φ_k(k_s)
    y_t = Σ_s a_ts v_s / Σ_s a_ts                 one normaliser for both parts; then out_t = W_o y_t
    m_t = max over the window of q_t·k_s / √d     (the official code's: the linear terms are not rescaled by it)
No decay and no GroupNorm: the normaliser Σ_s a_ts keeps each output a weighted mean of values, on the softmax
output's own scale.

The state that replaces the KV cache (LoLCATsState): per head S = Σ φ_k(k_s) v_sᵀ (2f x d) and z = Σ φ_k(k_s)
over the keys that have left the window, and the last w - 1 keys and values (the window of the next token).

Two forms of one layer, equal up to rounding (tests/test_lolcats.py):
  `parallel`  the formula above with T x T masks, from an empty state: for reading, and the tests' reference;
  `chunked`   THE DEFAULT for training, scoring and decoding: queries in chunks of C tokens, each chunk reading
              its band of C + w - 1 keys and the state S, z of all keys before the band; keys leave the band
              into S, z as the chunk moves on. Memory linear in length; C = 1 is the recurrent step.

Training, as the official configs (distill_*_xent0_mse1000_lr1e-2, finetune_lora_qkvo_*):
  1. attention transfer: φ_q, φ_k and α train; the loss is the MSE between each layer's linear-window output
     and its softmax output (both before W_o), mean over layers, x 1000; each layer reads the softmax model's
     hidden states. AdamW lr 1e-2, no weight decay, constant lr, no gradient clipping.
  2. LoRA rank 8, alpha 16, no dropout, on W_q, W_k, W_v, W_o; next-token loss; AdamW lr 1e-4, constant, no
     clipping. (Their lr schedule is reduce-on-plateau on a validation loss checked every 100 steps: constant
     at any budget here.)

Where this differs: the official feature map weights W are (H, d, f) per layer, kaiming-uniform, and so are
these; GQA keys and values are repeated for each query head before φ_k, as theirs. Attention arithmetic runs in
float32 with autocast off, whatever the model's dtype.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from load_llama import load_model
from lora import LoRALinear, add_lora, lora_parameters
from methods.supra import Phase, load_tensors, read_checkpoint_config
from model import Attention, Transformer, apply_rope, rope_cos_sin

WINDOW = 64                  # w: softmax keys beside the linear part (the official wsw64 configs)
FEATURE_DIM = 64             # f: Hedgehog features per sign (fd64)
WINDOW_FACTOR_INIT = 0.1     # σ(α) at the start (init_window_factor -2.197 = logit(0.1))
MSE_FACTOR = 1000.0          # the transfer loss's scale (mse_factor 1000)
LORA = dict(rank=8, alpha=16.0, dropout=0.0,
            targets=("attention.wq", "attention.wk", "attention.wv", "attention.wo"))


# ----------------------------------------------------------------------------- φ: Hedgehog's feature map

class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(x W^h), softmax(-x W^h)] for every head h at once: x (bs, H, T, d) -> (bs, H, T, 2f)."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int, generator: torch.Generator | None = None,
                 **like):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim, feature_dim, **like))  # W^h, one per head
        nn.init.kaiming_uniform_(self.weight, generator=generator)                          # as the official init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype))                    # (bs, H, T, f)
        return torch.cat((xw.softmax(-1), (-xw).softmax(-1)), dim=-1)                     # (bs, H, T, 2f)


# ----------------------------------------------------------------------------- the two forms
# q, k: (bs, H, T, d) after RoPE; v: (bs, H, T, dv); fq, fk: (bs, H, T, F) = φ_q(q), φ_k(k); omega: (H,) = σ(α).

def parallel(q, k, v, fq, fk, omega, window: int) -> torch.Tensor:
    """y = (A_window + A_linear) V / row sums, from an empty state. Memory T x T per head: the form for reading."""
    t = torch.arange(q.shape[-2], device=q.device)
    distance = t[:, None] - t[None, :]                                         # (T, T): t - s
    in_window, in_linear = (distance >= 0) & (distance < window), distance >= window
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5                  # (bs, H, T, T)
    scores = scores.masked_fill(~in_window, -math.inf)
    a_window = omega.view(-1, 1, 1) * torch.exp(scores - scores.amax(-1, keepdim=True))
    a_linear = (fq @ fk.transpose(-1, -2)) * in_linear                         # φ_q(q_t)·φ_k(k_s), s <= t - w
    a = a_window + a_linear
    return (a @ v) / a.sum(-1, keepdim=True)                                   # (bs, H, T, dv)


@dataclass
class LayerState:
    """One layer's memory of the text: S, z over the keys that left the window; the window's last keys."""
    S: torch.Tensor    # (bs, H, F, dv) Σ φ_k(k_s) v_sᵀ
    z: torch.Tensor    # (bs, H, F)     Σ φ_k(k_s)
    k: torch.Tensor    # (bs, H, n, d)  the last n <= w - 1 keys (after RoPE), values and features
    v: torch.Tensor    # (bs, H, n, dv)
    fk: torch.Tensor   # (bs, H, n, F)

    @classmethod
    def empty(cls, bs: int, H: int, d: int, dv: int, F_: int, device) -> "LayerState":
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        return cls(z(bs, H, F_, dv), z(bs, H, F_), z(bs, H, 0, d), z(bs, H, 0, dv), z(bs, H, 0, F_))

    @property
    def device(self) -> torch.device:  # where model.generate and supra.score_block look for a cache's device
        return self.S.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.k, self.v, self.fk))


def chunked(q, k, v, fq, fk, omega, window: int, state: LayerState, chunk: int) -> tuple[torch.Tensor, LayerState]:
    """Queries in chunks of `chunk`; each reads its band of keys (the state's window keys, then these) and S, z
    of every key before the band. Returns y and the state after the last token."""
    P, T = state.k.shape[-2], q.shape[-2]                  # window keys carried in, new tokens
    K, V, FK = (torch.cat(pair, dim=-2) for pair in ((state.k, k), (state.v, v), (state.fk, fk)))  # (bs, H, P+T, ·)
    S, z = state.S, state.z
    w_ = omega.view(-1, 1, 1)
    scale = q.shape[-1] ** -0.5
    outs, lo = [], 0                                        # keys before index lo are in S, z
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        i = torch.arange(P + a, P + b, device=q.device)     # the queries' indices in K
        j = torch.arange(lo, P + b, device=q.device)        # the band: every key a query of the chunk reads one by one
        distance = i[:, None] - j[None, :]
        in_window, in_linear = (distance >= 0) & (distance < window), distance >= window
        qc, fqc = q[..., a:b, :], fq[..., a:b, :]
        scores = ((qc @ K[..., lo:P + b, :].transpose(-1, -2)) * scale).masked_fill(~in_window, -math.inf)
        a_window = w_ * torch.exp(scores - scores.amax(-1, keepdim=True))                    # (bs, H, C, band)
        a_linear = (fqc @ FK[..., lo:P + b, :].transpose(-1, -2)) * in_linear
        att = a_window + a_linear
        num = att @ V[..., lo:P + b, :] + fqc @ S                                           # (bs, H, C, dv)
        den = att.sum(-1) + (fqc * z[..., None, :]).sum(-1)                                 # (bs, H, C)
        outs.append(num / den[..., None])
        # keys that no later query sees in its window leave the band for S, z
        new_lo = max(lo, P + b - window + 1)
        S = S + FK[..., lo:new_lo, :].transpose(-1, -2) @ V[..., lo:new_lo, :]
        z = z + FK[..., lo:new_lo, :].sum(-2)
        lo = new_lo
    # what stays in the band is the window of the next token: the last w - 1 keys
    after = LayerState(S, z, K[..., lo:, :], V[..., lo:, :], FK[..., lo:, :])
    return torch.cat(outs, dim=-2), after


# ----------------------------------------------------------------------------- the layer

FORMS = ("chunked", "parallel")


class LoLCATsAttention(nn.Module):
    """LoLCATs' attention for one layer: the layer's own wq, wk, wv, wo (the same modules, so LoRA wraps them as
    before), φ_q and φ_k, and the window weights α. Called like model.Attention; where that takes the layer's
    cached keys, this takes the layer's LayerState (see LoLCATsState)."""

    def __init__(self, attention: Attention, window: int = WINDOW, feature_dim: int = FEATURE_DIM,
                 chunk: int = 256, form: str = "chunked", generator: torch.Generator | None = None):
        super().__init__()
        if form not in FORMS or chunk < 1 or window < 1 or feature_dim < 1:
            raise ValueError(f"form must be one of {FORMS}, chunk, window and feature_dim >= 1 "
                             f"(got {form!r}, {chunk}, {window}, {feature_dim})")
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        weight = (self.wo.base if isinstance(self.wo, LoRALinear) else self.wo).weight
        like = dict(device=weight.device, dtype=torch.float32)  # float32 whatever the model's dtype: they train
        self.feature_map_q = HedgehogFeatureMap(self.n_heads, self.head_dim, feature_dim, generator, **like)
        self.feature_map_k = HedgehogFeatureMap(self.n_heads, self.head_dim, feature_dim, generator, **like)
        logit = math.log(WINDOW_FACTOR_INIT / (1 - WINDOW_FACTOR_INIT))
        self.window_factor = nn.Parameter(torch.full((self.n_heads,), logit, **like))      # α_h; ω_h = σ(α_h)
        self.requires_grad_(False)  # as the loaded model: a training phase chooses what trains
        self.window, self.feature_dim, self.chunk, self.form = window, feature_dim, chunk, form

    def qkv(self, x, cos, sin):
        """q, k (after RoPE) and v, each (bs, n_heads, seqlen, d): the softmax attention's own, kv heads repeated."""
        bsz, seqlen, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q = self.wq(x).view(bsz, seqlen, H, d).transpose(1, 2)                        # (bs, n_heads, seqlen, d)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, d).transpose(1, 2)          # (bs, n_kv_heads, seqlen, d)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, d).transpose(1, 2)          # (bs, n_kv_heads, seqlen, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)                        # RoPE before φ
        k, v = (t.repeat_interleave(H // self.n_kv_heads, dim=1) for t in (k, v))      # (bs, n_heads, seqlen, d)
        return q, k, v

    def heads(self, q, k, v, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState | None]:
        """The linear-window output of every head before W_o, (bs, n_heads, seqlen, d) in float32, and the
        state after these tokens (None for the parallel form, which starts from an empty state)."""
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            fq, fk = self.feature_map_q(q), self.feature_map_k(k)
            omega = torch.sigmoid(self.window_factor)
            if self.form == "parallel":
                if state is not None:
                    raise ValueError("the parallel form starts from an empty state: use chunked")
                return parallel(q, k, v, fq, fk, omega, self.window), None
            if state is None:
                bsz, H, _, d = q.shape
                state = LayerState.empty(bsz, H, d, v.shape[-1], fq.shape[-1], q.device)
            return chunked(q, k, v, fq, fk, omega, self.window, state, self.chunk)

    def forward(self, x, cos, sin, start_pos: int, cache_k=None, cache_v=None):
        """x (bs, seqlen, dim) -> (bs, seqlen, dim). cache_k: this layer's LayerState, read as the state before
        these tokens and updated to the state after them; None: an empty state (training). start_pos only
        places RoPE (in cos, sin)."""
        bsz, seqlen, _ = x.shape
        if cache_k is not None and not isinstance(cache_k, LayerState):
            raise ValueError("a LoLCATs model takes a LoLCATsState, not a KVCache or a RecurrentState")
        y, after = self.heads(*self.qkv(x, cos, sin), cache_k)
        if cache_k is not None:
            cache_k.S, cache_k.z, cache_k.k, cache_k.v, cache_k.fk = after.S, after.z, after.k, after.v, after.fk
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, -1).to(x.dtype))


def softmax_heads(q, k, v) -> torch.Tensor:
    """The teacher: causal softmax attention of every head before W_o, (bs, n_heads, seqlen, d)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def linearize(model: Transformer, window: int = WINDOW, feature_dim: int = FEATURE_DIM, chunk: int = 256,
              form: str = "chunked", generator: torch.Generator | None = None) -> None:
    """Put a LoLCATsAttention in place of every layer's softmax attention, reusing the layer's wq, wk, wv, wo.
    Afterwards the model takes a LoLCATsState where it took a KVCache."""
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.attention, Attention):
            raise ValueError(f"layer {i}: attention is a {type(layer.attention).__name__}, not softmax Attention "
                             "(linearised already?)")
        layer.attention = LoLCATsAttention(layer.attention, window, feature_dim, chunk, form, generator)


class LoLCATsState:
    """The linearised model's memory of the text, one LayerState per layer: S, z (fixed size) and the window's
    last w - 1 keys and values. It goes where a KVCache goes, `model(tokens, start_pos, state)`:
    Transformer.hidden_states hands layer i `state.k[i]`. As with the KV cache, the caller owns it and the
    position: it holds text[:length], and `advance(n)` says that n more tokens were just folded in."""

    def __init__(self, model: Transformer, batch: int = 1):
        a = model.args
        device = next(model.parameters()).device
        features = 2 * model.layers[0].attention.feature_dim
        self.k = [LayerState.empty(batch, a.n_heads, a.head_dim, a.head_dim, features, device)
                  for _ in range(a.n_layers)]
        self.v = [None] * a.n_layers
        self.max_len = math.inf  # no window on the text: any position fits
        self.length = 0

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.k)


# ----------------------------------------------------------------------------- training: transfer, then LoRA

def recipe(transfer_tokens: int, lora_tokens: int) -> list[Phase]:
    """The two steps, on the given tokens each: constant lr, no weight decay, no clipping (as their trainer)."""
    return [Phase("transfer", "attention_transfer", "feature_map", transfer_tokens, 1e-2, 0.0, (0.9, 0.999),
                  "constant", None),
            Phase("lora", "next_token", "lora", lora_tokens, 1e-4, 0.0, (0.9, 0.999), "constant", None)]


def phase_parameters(model: Transformer, phase: Phase) -> dict[str, nn.Parameter]:
    """The parameters a phase trains, by name (the names key the checkpoints). Found by module type."""
    if phase.trains == "feature_map":
        chosen = [p for m in model.modules() if isinstance(m, LoLCATsAttention)
                  for p in (m.feature_map_q.weight, m.feature_map_k.weight, m.window_factor)]
    elif phase.trains == "lora":
        chosen = lora_parameters(model)
    else:
        raise ValueError(f"unknown phase.trains {phase.trains!r} (feature_map or lora)")
    ids = {id(p) for p in chosen}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def attention_transfer_loss(model: Transformer, seqs: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Run the softmax model layer by layer; in each layer the linear-window heads read the same q, k, v as the
    softmax heads, and the loss is MSE_FACTOR x the mean over layers of the MSE between the two (before W_o).
    The softmax output flows on, so each layer learns on the hidden states of the pretrained model and no
    gradient crosses from layer to layer. That is why `backward=True` may back-propagate each layer's term as
    soon as it is computed, holding one layer's graph instead of all of them (the same gradients; what makes
    long training sequences fit); it then returns the loss detached."""
    tokens = seqs[:, :-1]
    cos, sin = rope_cos_sin(model.args, 0, tokens.shape[1], tokens.device)
    with torch.no_grad():
        h = model.tok_embeddings(tokens)                                              # (bs, T, dim)
    loss = 0.0
    for layer in model.layers:
        attention = layer.attention
        with torch.no_grad():
            q, k, v = attention.qkv(layer.attention_norm(h), cos, sin)
            target = softmax_heads(q, k, v)                                           # (bs, n_heads, T, d)
        predicted, _ = attention.heads(q, k, v)
        term = MSE_FACTOR * F.mse_loss(predicted, target.float()) / len(model.layers)
        if backward:
            term.backward()
            term = term.detach()
        loss = loss + term
        with torch.no_grad():  # TransformerBlock.forward, with the softmax attention
            h = h + attention.wo(target.transpose(1, 2).flatten(2))
            h = h + layer.feed_forward(layer.ffn_norm(h))
    return loss


# ----------------------------------------------------------------------------- building and reloading

def build(base_model, device, dtype: torch.dtype, window: int = WINDOW, feature_dim: int = FEATURE_DIM,
          chunk: int = 256, seed: int = 0) -> Transformer:
    """The pretrained model, linearised (feature maps drawn from `seed`), with LoLCATs' LoRA wrappers from the
    start (a fresh adapter is the identity): the skeleton that a checkpoint fills."""
    model = load_model(base_model, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    linearize(model, window, feature_dim, chunk, generator=generator)
    add_lora(model, **LORA, generator=generator)
    return model


def load_lolcats(folder, device="cpu", dtype: torch.dtype = torch.float32, base_model=None) -> tuple[Transformer, dict]:
    """A saved LoLCATs model (methods.supra.save_checkpoint's files): its base checkpoint loaded, linearised and
    filled with the saved tensors. Returns the model and its config."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    model = build(base_model or config["base_model"], device, dtype, config["window"], config["feature_dim"],
                  config["chunk"], config["seed"])
    load_tensors(model, folder / config["weights"])
    return model.eval(), config
