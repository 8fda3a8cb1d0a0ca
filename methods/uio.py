"""UIO-LLMs (Li et al., "UIO-LLMs: Unbiased Incremental Optimization for Long-Context LLMs", arXiv 2406.18173):
compress each segment of a long text into M memory tokens, and read the next segment with the memories of
all earlier segments as a key/value prefix. The base model stays frozen; two LoRAs and M vectors train.

    s_0 s_1 s_2 ...      the text, cut into segments of L tokens (when scoring: the protocol's blocks, L = Δ)
    e                    the memory embedding: M trained vectors (M, dim), appended to every segment
    encoder              the base model + LoRA_enc on wq, wv. It reads [s_t ; e] (positions 0 .. L+M-1, causal:
                         every memory token sees the whole segment) and keeps, at every layer l (from layer 1 by
                         default, from layer 0 in the paper: see layer0_memory below),
    x_t^l (M, dim)       the input of attention (after attention_norm) at the M memory positions: the memory of s_t
    decoder              the base model + LoRA_dec on wk, wv, applied to the memories only. It reads s_t after
                         a BOS key/value at position 0 (the sink, by default; see below) and
                         K^l = RoPE(wk_dec x_s^l), V^l = wv_dec x_s^l of every earlier segment s < t,
                         memory s at positions 1+s*M .. s*M+M (0-based without the sink) and s_t itself after
                         them (contiguous): a 32K-token text is 1 + 31*32 + 1024 = 2017 positions when its last
                         segment is read.

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

Two traps of the design, each a flag of UIOConfig (the official code has both; the default here is the fixed
form, because on SmolLM2 the paper's form makes even untrained memory cost +61-69% perplexity against no
memory, see docs/uio.md):
- sink: a model trained on texts that start with BOS puts a large share of its attention on the first
  position of the window (the attention sink). With the memories first, a memory token sits there and the
  segment's own first token no longer is the sink; the memory, read by every later token, takes that share.
  sink=True reads a BOS key/value at position 0 ahead of the memories (the base model's, fixed):
      positions   [ BOS | memory 0 | ... | memory t-1 | segment t ]
  (segment 0, read without memories, is read alone as the base model reads it.)
- layer0_memory: the memory at layer 0 is the attention input there, RMSNorm(e): the same M vectors for every
  segment, so it carries nothing about the segment while its share of layer-0 attention grows with the number
  of memories. layer0_memory=False keeps no layer-0 memory (memories at layers 1 .. n-1): the decoder's layer 0
  reads only the sink and the segment, at the same positions as the other layers (the cache of layer 0 is
  shorter; RoPE depends only on position differences, so the cache index need not be the position).
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
    sink: bool = True            # a BOS key/value at position 0 ahead of the memories (False: the paper's layout)
    layer0_memory: bool = False  # keep the layer-0 memory RMSNorm(e), the same for every segment (True: the paper's)
    bos: int | None = None       # the sink's token: the tokenizer's BOS (needed when sink is on)


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
    if cfg.sink and cfg.bos is None:
        problems.append("the sink needs the BOS token id (UIOConfig.bos)")
    last = int(cfg.sink) + (segments - 1) * cfg.memories + cfg.segment  # positions when the last segment is read
    if last > max_len:
        problems.append(f"{segments} segments: the last one is read at {last} positions (sink + (segments - 1) x "
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
    (wq: encoder LoRA, wk: decoder LoRA, wv: both; the last layer: the decoder's only; layer 0 without a
    memory: the encoder's only). `remove()` puts the base linears back. `first`: the first layer that keeps
    a memory (0, or 1 without the layer-0 memory)."""

    def __init__(self, model: Transformer, cfg: UIOConfig):
        if any(isinstance(m, (LoRALinear, Switch)) for m in model.modules()):
            raise ValueError("the model already has adapters; remove them first")
        if cfg.sink and cfg.bos is None:
            raise ValueError("UIOConfig.sink needs bos, the token id read at position 0")
        if not cfg.layer0_memory and len(model.layers) < 2:
            raise ValueError("without the layer-0 memory a one-layer model has no memory at all")
        self.model, self.cfg = model, cfg
        self.first = 0 if cfg.layer0_memory else 1
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
                            for on in (name in ENCODER_TARGETS and i < last,
                                       name in DECODER_TARGETS and i >= self.first))
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
    """The encoder reads segment (B, L) followed by the M memory tokens e; returns the memory of the segment:
    x^l (B, M, dim) for every layer l from uio.first on, the input of that layer's attention at the memory
    positions (what the decoder's wk and wv will read). At layer 0 that input is RMSNorm(e) whatever the
    segment, hence uio.first = 1 by default. These are the core layers, called one by one because the
    per-layer inputs are the output here (Transformer.hidden_states returns the last layer's only)."""
    M = uio.cfg.memories
    uio.use("encoder")
    e = uio.memory.to(model.tok_embeddings.weight.dtype)[None].expand(segment.shape[0], -1, -1)  # (B, M, dim)
    h = torch.cat([model.tok_embeddings(segment), e], dim=1)                               # (B, L + M, dim)
    cos, sin = rope_cos_sin(model.args, 0, h.shape[1], h.device)                           # positions 0 .. L+M-1
    memory = []
    for i, layer in enumerate(model.layers):
        if i >= uio.first:
            memory.append(layer.attention_norm(h[:, -M:]))  # x^l (B, M, dim); RMSNorm is per position: M rows suffice
        if i + 1 < len(model.layers):                    # the last layer's output is never read
            h = layer(h, cos, sin, 0)
    return memory


# ----------------------------------------------------------------------------- decoder: the memories as a K/V prefix

def memory_kv(model: Transformer, uio: UIO, states: list[torch.Tensor], start: int) -> tuple[list, list]:
    """Keys and values of memories for the decoder: per memory layer (uio.first ..), x^l (B, P, dim) through wk
    and wv with the decoder's LoRA, keys rotated to positions start .. start+P-1. Each (B, n_kv_heads, P,
    head_dim)."""
    uio.use("decoder")
    B, P = states[0].shape[:2]
    cos, sin = rope_cos_sin(model.args, start, P, states[0].device)                        # (P, head_dim)
    keys, values = [], []
    for layer, x in zip(model.layers[uio.first:], states):
        att = layer.attention
        x = x.to(model.tok_embeddings.weight.dtype)
        k = att.wk(x).view(B, P, att.n_kv_heads, att.head_dim).transpose(1, 2)           # (B, n_kv_heads, P, head_dim)
        v = att.wv(x).view(B, P, att.n_kv_heads, att.head_dim).transpose(1, 2)           # (B, n_kv_heads, P, head_dim)
        keys.append(apply_rope(k, cos, sin))
        values.append(v)
    return keys, values


@torch.no_grad()
def sink_kv(model: Transformer, uio: UIO) -> tuple[list, list]:
    """The base model's keys and values of the BOS token at position 0, per layer (1, n_kv_heads, 1, head_dim):
    the attention sink ahead of the memories. A constant of the base weights (nothing of UIO's trains it)."""
    uio.use("base")
    emb = model.tok_embeddings.weight
    cache = KVCache(model.args, 1, 1, emb.device, emb.dtype)
    model.hidden_states(model.tok_embeddings(torch.tensor([[uio.cfg.bos]], device=emb.device)), 0, cache)
    return cache.k, cache.v


def prefix_lengths(model: Transformer, uio: UIO | None, n_memories: int) -> tuple[list[int], int]:
    """Where segment t is read after n_memories memories: the number of cache entries ahead of it in each
    layer, and its first position. Every layer holds [sink][memories][segment]; a layer below uio.first
    holds no memories; the sink is there once there is a memory (segment 0 is read alone, as by the base)."""
    if uio is None or n_memories == 0:
        return [0] * len(model.layers), 0
    sink, P = int(uio.cfg.sink), n_memories * uio.cfg.memories
    return [sink + (P if i >= uio.first else 0) for i in range(len(model.layers))], sink + P


def read_segment(model: Transformer, cache: KVCache, lengths: list[int], position: int,
                 h: torch.Tensor) -> torch.Tensor:
    """The base layers on input embeddings h (B, L, dim) at positions position .. position+L-1, layer i's
    keys and values written after its lengths[i] cached entries and attending to all of them; returns the
    final hidden states (B, L, dim). Transformer.hidden_states with a cache index per layer: its keys are
    rotated at their own positions, so a layer whose cache is shorter (no layer-0 memory) still reads the
    others at the right distances."""
    cos, sin = rope_cos_sin(model.args, position, h.shape[1], h.device)                   # (L, head_dim)
    for i, layer in enumerate(model.layers):
        h = layer(h, cos, sin, lengths[i], cache.k[i], cache.v[i])
    return model.norm(h)


def decode(model: Transformer, uio: UIO | None, memories: list[list[torch.Tensor]],
           segment: torch.Tensor) -> torch.Tensor:
    """The decoder reads segment t (B, L) after the memories of segments 0 .. t-1 (each a list of x^l per
    memory layer) and the sink; returns its final hidden states (B, L, dim). The reading form, used in
    training: the memories' keys and values are recomputed here, so the decoder's LoRA gets its gradient from
    every loss."""
    B, L = segment.shape
    lengths, position = prefix_lengths(model, uio, len(memories))
    emb = model.tok_embeddings.weight
    cache = KVCache(model.args, B, max(lengths) + L, emb.device, emb.dtype)
    if memories:
        sink = int(uio.cfg.sink)
        if sink:
            keys, values = sink_kv(model, uio)
            for layer in range(len(model.layers)):
                cache.k[layer][:, :, :1] = keys[layer]
                cache.v[layer][:, :, :1] = values[layer]
        states = [torch.cat([m[l] for m in memories], dim=1) for l in range(len(memories[0]))]  # (B, P, dim) each
        keys, values = memory_kv(model, uio, states, sink)
        for l, layer in enumerate(range(uio.first, len(model.layers))):
            cache.k[layer][:, :, sink:lengths[layer]] = keys[l]
            cache.v[layer][:, :, sink:lengths[layer]] = values[l]
    if uio is not None:
        uio.use("base")                                         # the segment's own q, k, v: the base model's
    return read_segment(model, cache, lengths, position, model.tok_embeddings(segment))


def segment_nll(model: Transformer, hidden: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of targets (B, n) given the decoder's hidden states (B, n, dim);
    with mask (B, n, bool), of the masked targets only."""
    logits = model.output(hidden).flatten(0, 1).float()                                    # (B * n, vocab)
    if mask is None:
        return F.cross_entropy(logits, targets.flatten(), reduction="sum")
    keep = mask.flatten()
    return F.cross_entropy(logits[keep], targets.flatten()[keep], reduction="sum")


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


def text_gradient(model: Transformer, uio: UIO, ids: torch.Tensor, rng: random.Random,
                  answer: torch.Tensor | None = None) -> float:
    """Truncated BPTT over texts of S segments, ids (B, S*L + 1): accumulate into .grad of every tensor that
    requires it (uio.parameters(), and the base's if they train) the gradient estimate (uio.cfg.bptt) of the
    loss, the mean next-token cross-entropy over the B*S*L targets, or over those where answer (B, S*L, bool)
    is set; returns the loss. Each segment's loss is back-propagated as soon as it is computed; a segment with
    no target in `answer` is not decoded. The reservoir's draws are shared by the B texts."""
    L, k, bptt = uio.cfg.segment, uio.cfg.keep, uio.cfg.bptt
    S = (ids.shape[1] - 1) // L
    count = ids.shape[0] * S * L if answer is None else int(answer[:, :S * L].sum())
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
        mask = None if answer is None else answer[:, t * L:(t + 1) * L]
        # 1. decode segment t after memories 0 .. t-1 and back-propagate its loss at once (incremental)
        if mask is None or mask.any():
            loss = segment_nll(model, decode(model, uio, memories, segment), targets, mask) / count
            if loss.requires_grad:  # segment 0 of a frozen base: nothing to train there
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

        cache positions   [ sink | memory 0 | memory 1 | ... | memory i-1 | block i's input ]

    (without the layer-0 memory, layer 0's cache holds [ sink | block i's input ] at the same positions).
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
        sink = int(uio is not None and uio.cfg.sink)
        self.cache = KVCache(model.args, 1, sink + (blocks - 1) * M + delta, emb.device, emb.dtype)
        self.memories = 0  # the cache holds the memories of segments 0 .. memories-1

    def _clock(self) -> float:  # CUDA runs asynchronously: wait for it, or the time lands in the wrong phase
        if self.cache.k[0].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @torch.no_grad()
    def __call__(self, i: int, start: int, end: int) -> dict:
        model, uio, cache = self.model, self.uio, self.cache
        tic = self._clock()
        segment = torch.tensor([self.ids[start - 1:end - 1]], device=cache.k[0].device)        # (1, n)
        targets = torch.tensor([self.ids[start:end]], device=segment.device)
        if uio is not None:
            uio.use("base")
        lengths, position = prefix_lengths(model, uio, self.memories)
        hidden = read_segment(model, cache, lengths, position, model.tok_embeddings(segment))
        out = {"nll_uio": segment_nll(model, hidden, targets).item(), "memory_positions": position}
        decoded = self._clock()
        if uio is not None and end < len(self.ids):  # a memory that a later block will read
            if self.memories == 0 and uio.cfg.sink:  # the sink goes in with the first memory, at index 0
                keys, values = sink_kv(model, uio)
                for layer in range(len(model.layers)):
                    cache.k[layer][:, :, :1] = keys[layer]
                    cache.v[layer][:, :, :1] = values[layer]
            lengths, position = prefix_lengths(model, uio, self.memories + 1)
            M = uio.cfg.memories
            keys, values = memory_kv(model, uio, encode(model, uio, segment), position - M)
            for l, layer in enumerate(range(uio.first, len(model.layers))):  # over this block's own K/V
                cache.k[layer][:, :, lengths[layer] - M:lengths[layer]] = keys[l]
                cache.v[layer][:, :, lengths[layer] - M:lengths[layer]] = values[l]
            self.memories += 1
            uio.use("base")
        out["seconds"] = {"decode": decoded - tic, "encode": self._clock() - decoded}
        return out
