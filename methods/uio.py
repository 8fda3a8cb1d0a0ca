"""UIO-LLMs (Li et al., "UIO-LLMs: Unbiased Incremental Optimization for Long-Context LLMs", arXiv 2406.18173):
compress each segment of a long text into M memory tokens, and read the next segment with the memories of
all earlier segments as a key/value prefix. The base model stays frozen; two LoRAs and M vectors train.

    s_0 s_1 s_2 ...      the text, cut into segments of L tokens (when scoring: the protocol's blocks, L = Δ)
    e                    the memory embedding: M trained vectors (M, dim), appended to every segment
    encoder              the base model + LoRA_enc on wq, wv. It reads [s_t ; e] (positions 0 .. L+M-1, causal:
                         every memory token sees the whole segment) and keeps, at every layer l,
    x_t^l (M, dim)       the input of attention (after attention_norm) at the M memory positions: the memory of s_t
    decoder              the base model + LoRA_dec on wk, wv, applied to the memories only. It reads s_t after
                         K^l = RoPE(wk_dec x_s^l), V^l = wv_dec x_s^l of every earlier segment s < t,
                         memory s at positions s*M .. s*M+M-1 and s_t itself at t*M .. t*M+L-1 (contiguous):
                         a 32K-token text is 31*32 + 1024 = 2016 positions when its last segment is read.

Training (truncated BPTT, section 3 of the paper). The loss of segment t reaches the encoder through the
memories of every s < t. Keeping all encoder graphs alive until the end is exact but its memory grows with
the text. Instead the decoder reads each memory through a detached copy (a leaf), each loss is
back-propagated as soon as it is computed (incremental: one decoder graph at a time), and the gradient that
the later losses leave on the leaf of x_s is pushed into the encoder's graph of s once, when s leaves the set
R of at most k live encoder graphs. Which graphs R keeps (`bptt`):
    full       all of them (the exact gradient; memory grows with the text: for short texts)
    recent     the last k segments (biased: every path longer than k segments is dropped)
    reservoir  a uniform sample of k (Vitter's algorithm R): when segment t is read, each earlier memory is in
               R with probability p_t = min(1, k/t), so loss t's gradient into the memories is weighted 1/p_t
               and the estimate is unbiased: E[sum_t sum_{s<t, s in R_t} g_st / p_t] = sum_t sum_{s<t} g_st.
The decoder's LoRA acts on the leaves, so it always gets its exact gradient; only the encoder's (LoRA_enc
and e), which flows back through the encoder passes, is estimated.

Differences from the official code (wenhaoli-xmu/UIO-LLMs, src/modifiers/modify_llama_uiollms.py):
- attention is the core model's: scale 1/sqrt(head_dim) and grouped-query attention (official: sqrt(128)
  hard-coded, no GQA), RoPE at the true positions (official: a table of 4096 positions);
- the memory tokens follow the segment with plain causal attention (official: memory token i sits at
  position (i+1)*L/M and sees the first (i+1)*L/M tokens and itself); e is M vectors, which start as copies
  of one token's embedding (official: one vector repeated M times, from the embedding of token 2);
- the reservoir's 1/p_t weights (the released train.py samples the reservoir without them).
"""
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRALinear
from model import KVCache, Transformer, apply_rope, rope_cos_sin

BPTT_MODES = ("full", "recent", "reservoir")
ENCODER_TARGETS = ("wq", "wv")  # LoRA_enc (official: q_proj, v_proj)
DECODER_TARGETS = ("wk", "wv")  # LoRA_dec, on the memories only (official: k_proj, v_proj)


@dataclass
class UIOConfig:
    segment: int = 1024          # L: tokens per segment
    memories: int = 32           # M: memory tokens per segment (L/M = 32x compression)
    rank: int = 128              # r of both LoRAs
    alpha: float = 512.0         # LoRA scale alpha / r
    bptt: str = "reservoir"      # which encoder graphs stay alive in training: full, recent, reservoir
    keep: int = 2                # k: live encoder graphs of "recent" and "reservoir" (official tbptt = 2)
    memory_init: int | None = None  # token whose embedding every row of e starts from (None: the mean embedding)
    seed: int = 0                # LoRA A's initialisation


def check_sizes(cfg: UIOConfig, max_len: int, segments: int) -> None:
    """Reject sizes that cannot work, naming the flag. `segments`: the most segments one text is cut into."""
    problems = []
    if cfg.segment < 2 or cfg.memories < 1 or cfg.rank < 1:
        problems.append(f"--segment must be >= 2, --memories and --rank >= 1 (got {cfg.segment}, {cfg.memories}, "
                        f"{cfg.rank})")
    if cfg.bptt not in BPTT_MODES:
        problems.append(f"--bptt must be one of {', '.join(BPTT_MODES)}, got {cfg.bptt!r}")
    if cfg.keep < 1:
        problems.append(f"--reservoir (k) must be >= 1, got {cfg.keep}")
    if cfg.segment + cfg.memories > max_len:
        problems.append(f"--segment ({cfg.segment}) + --memories ({cfg.memories}) exceeds the model's "
                        f"max_position_embeddings ({max_len})")
    last = (segments - 1) * cfg.memories + cfg.segment  # positions when the last segment is read
    if last > max_len:
        problems.append(f"{segments} segments: the last one is read at {last} positions ((segments - 1) x "
                        f"--memories + --segment), more than the model's max_position_embeddings ({max_len})")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------- the trained parts

class Switch(nn.Module):
    """A frozen base linear and the LoRAs over it (the encoder's, the decoder's or both); `mode` picks the one
    that runs: "encoder", "decoder", or "base" (none). Both LoRALinear wrap this very base nn.Linear, so the
    base weights exist once and are never changed."""

    def __init__(self, base: nn.Linear, encoder: LoRALinear | None, decoder: LoRALinear | None):
        super().__init__()
        self.base, self.encoder, self.decoder = base, encoder, decoder
        self.mode = "base"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = {"encoder": self.encoder, "decoder": self.decoder}.get(self.mode)
        return (adapter or self.base)(x)


class UIO:
    """The memory embedding e and the two LoRAs, installed in a model: every layer's wq, wk, wv becomes a Switch
    (wq: encoder LoRA, wk: decoder LoRA, wv: both; the last layer: the decoder's only). `remove()` puts the
    base linears back."""

    def __init__(self, model: Transformer, cfg: UIOConfig):
        if any(isinstance(m, (LoRALinear, Switch)) for m in model.modules()):
            raise ValueError("the model already has adapters; remove them first")
        self.model, self.cfg = model, cfg
        emb = model.tok_embeddings.weight
        generator = torch.Generator(device=emb.device).manual_seed(cfg.seed)
        # e starts as M copies of one token's embedding (the official code: token 2, Llama 2's </s>) or of the
        # mean embedding; it trains in float32, as the LoRAs do
        start = emb[cfg.memory_init] if cfg.memory_init is not None else emb.mean(0)
        self.memory = nn.Parameter(start.detach().float().repeat(cfg.memories, 1))              # (M, dim)
        self.switches: dict[tuple[int, str], Switch] = {}
        last = len(model.layers) - 1
        for i, layer in enumerate(model.layers):
            for name in ("wq", "wk", "wv"):
                base = getattr(layer.attention, name)
                # not on the last layer's encoder: its memory is that layer's attention *input*, so the encoder's
                # last attention changes nothing the decoder reads
                enc, dec = (LoRALinear(base, cfg.rank, cfg.alpha, 0.0, generator=generator) if on else None
                            for on in (name in ENCODER_TARGETS and i < last, name in DECODER_TARGETS))
                self.switches[i, name] = Switch(base, enc, dec)
                setattr(layer.attention, name, self.switches[i, name])

    def use(self, mode: str) -> None:
        """Which LoRA every Switch runs from now on: "encoder", "decoder" or "base"."""
        for switch in self.switches.values():
            switch.mode = mode

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by a stable name (what is saved):
        memory, layers.{i}.attention.{wq|wk|wv}.{encoder|decoder}.lora_{a|b}."""
        out = {"memory": self.memory}
        for (i, name), switch in self.switches.items():
            for role in ("encoder", "decoder"):
                lora = getattr(switch, role)
                if lora is not None:
                    out[f"layers.{i}.attention.{name}.{role}.lora_a"] = lora.lora_a
                    out[f"layers.{i}.attention.{name}.{role}.lora_b"] = lora.lora_b
        return out

    def parameters(self) -> list[nn.Parameter]:
        return list(self.tensors().values())

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in; the names and shapes must be exactly those of tensors()."""
        mine = self.tensors()
        if set(tensors) != set(mine):
            raise ValueError(f"UIO tensors: missing {sorted(set(mine) - set(tensors))[:3]}, unexpected "
                             f"{sorted(set(tensors) - set(mine))[:3]}")
        for name, p in mine.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"UIO tensor {name}: shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[name])

    def remove(self) -> None:
        """Put the base linears back: the model is exactly what was loaded."""
        for (i, name), switch in self.switches.items():
            setattr(self.model.layers[i].attention, name, switch.base)


# ----------------------------------------------------------------------------- encoder: a segment -> its memory

def encode(model: Transformer, uio: UIO, segment: torch.Tensor) -> list[torch.Tensor]:
    """The encoder reads segment (1, L) followed by the M memory tokens e; returns the memory of the segment:
    x^l (1, M, dim) for every layer l, the input of that layer's attention at the memory positions (what the
    decoder's wk and wv will read). These are the core layers, called one by one because the per-layer inputs
    are the output here (Transformer.hidden_states returns the last layer's only)."""
    M = uio.cfg.memories
    uio.use("encoder")
    e = uio.memory.to(model.tok_embeddings.weight.dtype)[None]                             # (1, M, dim)
    h = torch.cat([model.tok_embeddings(segment), e], dim=1)                               # (1, L + M, dim)
    cos, sin = rope_cos_sin(model.args, 0, h.shape[1], h.device)                           # positions 0 .. L+M-1
    memory = []
    for i, layer in enumerate(model.layers):
        memory.append(layer.attention_norm(h[:, -M:]))   # x^l (1, M, dim); RMSNorm is per position: M rows suffice
        if i + 1 < len(model.layers):                    # the last layer's output is never read
            h = layer(h, cos, sin, 0)
    return memory


# ----------------------------------------------------------------------------- decoder: the memories as a K/V prefix

def memory_kv(model: Transformer, uio: UIO, states: list[torch.Tensor], start: int) -> tuple[list, list]:
    """Keys and values of memories for the decoder: per layer, x^l (1, P, dim) through wk and wv with the
    decoder's LoRA, keys rotated to positions start .. start+P-1. Each (1, n_kv_heads, P, head_dim)."""
    uio.use("decoder")
    P = states[0].shape[1]
    cos, sin = rope_cos_sin(model.args, start, P, states[0].device)                        # (P, head_dim)
    keys, values = [], []
    for layer, x in zip(model.layers, states):
        att = layer.attention
        x = x.to(model.tok_embeddings.weight.dtype)
        k = att.wk(x).view(1, P, att.n_kv_heads, att.head_dim).transpose(1, 2)           # (1, n_kv_heads, P, head_dim)
        v = att.wv(x).view(1, P, att.n_kv_heads, att.head_dim).transpose(1, 2)           # (1, n_kv_heads, P, head_dim)
        keys.append(apply_rope(k, cos, sin))
        values.append(v)
    return keys, values


def decode(model: Transformer, uio: UIO | None, memories: list[list[torch.Tensor]],
           segment: torch.Tensor) -> torch.Tensor:
    """The decoder reads segment t (1, L) after the memories of segments 0 .. t-1 (each a list of x^l per
    layer); returns its final hidden states (1, L, dim). The reading form, used in training: the memories'
    keys and values are recomputed here, so the decoder's LoRA gets its gradient from every loss."""
    M, L = (uio.cfg.memories if uio else 0), segment.shape[1]
    P = len(memories) * M                                       # memory positions 0 .. P-1, the segment at P ..
    emb = model.tok_embeddings.weight
    cache = KVCache(model.args, 1, P + L, emb.device, emb.dtype)
    if memories:
        states = [torch.cat([m[l] for m in memories], dim=1) for l in range(len(model.layers))]  # (1, P, dim) each
        keys, values = memory_kv(model, uio, states, 0)
        for layer in range(len(model.layers)):
            cache.k[layer][:, :, :P] = keys[layer]
            cache.v[layer][:, :, :P] = values[layer]
    if uio is not None:
        uio.use("base")                                         # the segment's own q, k, v: the base model's
    return model.hidden_states(model.tok_embeddings(segment), P, cache)


def segment_nll(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of targets (1, n) given the decoder's hidden states (1, n, dim)."""
    return F.cross_entropy(model.output(hidden)[0].float(), targets[0], reduction="sum")


# ----------------------------------------------------------------------------- training: truncated BPTT

def truncate(bptt: str, live: list[int], t: int, k: int, rng: random.Random) -> tuple[bool, int | None]:
    """Segment t has just been decoded: does its encoder graph join the live set R (`live`, updated here),
    and which segment leaves R (None: none)?"""
    if bptt == "full":
        live.append(t)
        return True, None
    if bptt == "recent":
        live.append(t)
        return True, (live.pop(0) if len(live) > k else None)
    if len(live) < k:  # reservoir (algorithm R): the first k fill it; then item t replaces slot j w.p. k/(t+1)
        live.append(t)
        return True, None
    j = rng.randrange(t + 1)
    if j >= k:
        return False, None
    leaving, live[j] = live[j], t
    return True, leaving


def memory_weight(bptt: str, t: int, k: int) -> float:
    """1 / p_t: the weight of loss t's gradient into the memories. With the reservoir each of the t earlier
    memories is live with probability min(1, k/t) when segment t is read; the others keep every live one."""
    return max(1.0, t / k) if bptt == "reservoir" else 1.0


def backward_weighted(loss: torch.Tensor, leaves: list[torch.Tensor], weight: float) -> None:
    """loss.backward(), with the part of the gradient that lands on `leaves` multiplied by `weight` (the
    parameters' gradients are not)."""
    if weight == 1.0:
        loss.backward()
        return
    before = [x.grad for x in leaves]
    for x in leaves:
        x.grad = None
    loss.backward()
    for x, g in zip(leaves, before):
        if x.grad is not None:
            x.grad = weight * x.grad if g is None else g + weight * x.grad
        else:
            x.grad = g


def text_gradient(model: Transformer, uio: UIO, ids: torch.Tensor, rng: random.Random) -> float:
    """Truncated BPTT over one text of S segments, ids (1, S*L + 1): accumulate into .grad of uio.parameters()
    the gradient estimate (uio.cfg.bptt) of the loss, the mean next-token cross-entropy over the S*L targets,
    which is returned. Each segment's loss is back-propagated as soon as it is computed."""
    L, k, bptt = uio.cfg.segment, uio.cfg.keep, uio.cfg.bptt
    S = (ids.shape[1] - 1) // L
    memories: list[list[torch.Tensor]] = []  # x_s^l as the decoder reads them: leaves while s is live
    graphs: dict[int, list[torch.Tensor]] = {}  # R: s -> the encoder's x_s^l, still attached to its graph
    live: list[int] = []
    total = 0.0

    def release(s: int) -> None:
        """s leaves R: push the gradient gathered on its leaves into its encoder graph, then free both."""
        outputs, leaves = graphs.pop(s), memories[s]
        pairs = [(x, leaf.grad.to(x.dtype)) for x, leaf in zip(outputs, leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])
        memories[s] = [leaf.detach() for leaf in leaves]  # a constant from now on

    for t in range(S):
        segment, targets = ids[:, t * L:(t + 1) * L], ids[:, t * L + 1:(t + 1) * L + 1]
        # 1. decode segment t after memories 0 .. t-1 and back-propagate its loss at once (incremental)
        loss = segment_nll(model, decode(model, uio, memories, segment), targets) / (S * L)
        if memories:  # the first segment is read by the base model alone: nothing of UIO's to train there
            backward_weighted(loss, [x for s in graphs for x in memories[s]], memory_weight(bptt, t, k))
        total += loss.item()
        if t == S - 1:
            break  # the last segment's memory would never be read
        # 2. encode segment t into its memory; its graph is kept only if it joins R
        joins, leaving = truncate(bptt, live, t, k, rng)
        if leaving is not None:
            release(leaving)
        if joins:
            graphs[t] = encode(model, uio, segment)
            # the leaves are float32: the gradients of every later loss add up on them
            memories.append([x.detach().float().requires_grad_() for x in graphs[t]])
        else:
            with torch.no_grad():
                memories.append([x.float() for x in encode(model, uio, segment)])
    for s in list(graphs):
        release(s)
    uio.use("base")
    return total


def train_step(model: Transformer, uio: UIO, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               rng: random.Random, max_grad_norm: float = 1.0) -> tuple[float, float]:
    """One optimizer step on one text (text_gradient, clip, AdamW); returns (loss, gradient norm before
    clipping). A non-finite loss or gradient skips the step (the norm is then NaN)."""
    params = uio.parameters()
    optimizer.zero_grad(set_to_none=True)
    loss = text_gradient(model, uio, ids, rng)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    if math.isfinite(loss) and math.isfinite(norm):
        optimizer.step()
    else:
        norm = math.nan
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


# ----------------------------------------------------------------------------- scoring a text: the fast form

class Reader:
    """UIO as a step of the block protocol (protocol.evaluate_blocks). Block i (tokens start .. end-1 of the
    text) is predicted from its input ids[start-1 : end-1], which is segment i of the text; the encoder then
    compresses that segment for the blocks after it. The fast form of `decode`: each memory's keys and values
    are computed once and stay in one KV cache ahead of the block being read:

        cache positions   [ memory 0 | memory 1 | ... | memory i-1 | block i's input ]

    uio None: no memory at all, each segment read alone by the base model (the "no memory" ablation)."""

    def __init__(self, model: Transformer, uio: UIO | None, ids: list[int], delta: int):
        self.model, self.uio, self.ids = model, uio, ids
        M = uio.cfg.memories if uio else 0
        if uio is not None and uio.cfg.segment != delta:
            raise ValueError(f"UIO segments are {uio.cfg.segment} tokens but the blocks {delta}: they must be equal")
        blocks = math.ceil((len(ids) - 1) / delta)
        if uio is not None:
            check_sizes(uio.cfg, model.args.max_seq_len, blocks)
        elif delta > model.args.max_seq_len:
            raise ValueError(f"--delta ({delta}) exceeds max_position_embeddings ({model.args.max_seq_len})")
        emb = model.tok_embeddings.weight
        self.cache = KVCache(model.args, 1, (blocks - 1) * M + delta, emb.device, emb.dtype)
        self.memory_end = 0  # positions 0 .. memory_end-1 hold the memories of the segments read so far

    def _clock(self) -> float:  # CUDA runs asynchronously: wait for it, or the time lands in the wrong phase
        if self.cache.k[0].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @torch.no_grad()
    def __call__(self, i: int, start: int, end: int) -> dict:
        model, uio = self.model, self.uio
        tic = self._clock()
        segment = torch.tensor([self.ids[start - 1:end - 1]], device=self.cache.k[0].device)   # (1, n)
        targets = torch.tensor([self.ids[start:end]], device=segment.device)
        if uio is not None:
            uio.use("base")
        hidden = model.hidden_states(model.tok_embeddings(segment), self.memory_end, self.cache)
        out = {"nll_uio": segment_nll(model, hidden, targets).item(), "memory_positions": self.memory_end}
        decoded = self._clock()
        if uio is not None and end < len(self.ids):  # a memory that a later block will read
            keys, values = memory_kv(model, uio, encode(model, uio, segment), self.memory_end)
            new = slice(self.memory_end, self.memory_end + uio.cfg.memories)  # over this block's own K/V
            for layer in range(len(model.layers)):
                self.cache.k[layer][:, :, new] = keys[layer]
                self.cache.v[layer][:, :, new] = values[layer]
            self.memory_end = new.stop
            uio.use("base")
        out["seconds"] = {"decode": decoded - tic, "encode": self._clock() - decoded}
        return out
