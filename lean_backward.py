"""The adapter step's memory: one Transformer block, its forward as model.py computes it, its backward
written out, so that it keeps a few tensors per layer instead of every intermediate.

Autograd keeps whatever each operation needs for its own backward. For one block of a Llama under a
LoRA adapter that is, per layer: the fp32 RMSNorm temporaries of two norms, the dropped-out input and
the dropout mask of each of seven adapters, q k v and the attention output (twice: once as the kernel
wrote it, once reshaped for wo), and the SwiGLU's gate, up, silu(gate) and product. Most of it can be
rebuilt in the backward from much less, because the base weights are frozen: a frozen linear needs its
input only for the gradient of its weight, which nobody wants. The backward here keeps

    x   the block's input            (T, dim)      -> attention_norm(x) again: elementwise, cheap
    h   after the attention residual (T, dim)      -> ffn_norm(h) again, then the gate w1(.) and the
                                                      up w3(.) again: two matmuls, the one thing computed twice
    q k v out, logsumexp                            what the attention kernel keeps for its own backward
    each adapter's dropout mask, 1 bit an element    the forward's own draw, eight to a byte (pack_mask)

and nothing else: about 6 (T, dim)-sized tensors per layer where autograd keeps about 27 (SmolLM2-135M at
4,096 tokens: the figures are in docs/speed-memory.md, from bench/step_memory.py). Keeping g and u instead of
computing them again would save two of the step's ~21 matmuls per layer and cost two (T, hidden) tensors per
layer, as much again as everything else kept (docs/speed-memory.md has both measured). The masks are kept
rather than drawn again from a saved generator state: drawing costs more than packing and unpacking
(about 4 ms against 0.5 ms for a (2048, 576) mask on a 2-core CPU), and packed they weigh a 32nd of the fp32
input they multiply. The forward calls the block's own modules, so its values are the plain forward's bit
for bit; the backward is the chain rule written out, so the gradients equal autograd's up to the order of
floating-point sums (tests/test_lean_backward.py). The attention's backward is torch's own kernel,
called by hand (attention, attention_backward).

What the process holds is more than what is kept: glibc keeps the pages of freed blocks, and a step
frees and allocates tensors of three sizes in turn, so the heap's holes grow layer by layer. trim_heap()
hands them back after a layer's forward or backward once the freed pages held have grown by TRIM_ABOVE.

Used by train_block.block_loss for every block it can serve: model.py's Attention and FeedForward, each
linear a plain nn.Linear or a LoRALinear, nothing trainable but the adapters. Anything else (a method's
own attention, a trained norm) runs the block's own forward under autograd.
"""
import ctypes
import ctypes.util
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRALinear
from model import Attention, FeedForward, RMSNorm, TransformerBlock, apply_rope

LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # the order the forward calls them


# glibc keeps the pages of freed blocks resident; malloc_trim(0) hands them back to the system (None elsewhere)
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def release_memory() -> None:
    """Give freed host memory back to the system: the peak RSS of a step is then what it holds, not what
    earlier phases left free in the heap (glibc only; the GPU's caching allocator is not touched)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33: struct mallinfo2, every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HAS_STATM = os.path.exists("/proc/self/statm")

TRIM_ABOVE = 256 << 20  # bytes of freed heap held resident past which trim_heap gives them back
_held_after_trim = 0      # what trim_heap found held just after its last trim: memory malloc does not count


def held_free() -> int:
    """Bytes the process holds resident beyond what malloc has handed out: its anonymous resident pages
    (/proc/self/statm) less malloc's blocks in use (mallinfo2). Mostly freed heap pages glibc keeps."""
    with open("/proc/self/statm") as f:
        resident, shared = (int(v) for v in f.read().split()[1:3])
    info = _MALLINFO2()
    return (resident - shared) * _PAGE - info.uordblks - info.hblkhd


def trim_heap() -> None:
    """release_memory() once the freed pages held resident have grown by TRIM_ABOVE bytes since the last
    trim. Pages handed back are faulted in again when reused: trimming whenever much of the heap lay free
    (free pages already handed back count there too) trimmed after nearly every layer and cost about 12% of
    a step on 2,048 tokens; counting only what is held since the last trim, a step trims a few times.
    The peaks with and without it are in docs/speed-memory.md. Nothing where glibc's mallinfo2 or /proc
    is missing."""
    global _held_after_trim
    if _MALLINFO2 is None or not _HAS_STATM:
        return
    if held_free() - _held_after_trim > TRIM_ABOVE:
        release_memory()
        _held_after_trim = held_free()


def adapters(layer: TransformerBlock) -> list[LoRALinear]:
    """The layer's adapters that train in this forward, in LINEARS order."""
    return [m for m in (layer.get_submodule(p) for p in LINEARS) if isinstance(m, LoRALinear) and m.enabled]


def can_serve(layer: nn.Module) -> bool:
    """True when lean_block computes exactly what layer(x, cos, sin, 0) computes."""
    if type(layer) is not TransformerBlock or type(layer.attention) is not Attention \
            or type(layer.feed_forward) is not FeedForward \
            or type(layer.attention_norm) is not RMSNorm or type(layer.ffn_norm) is not RMSNorm:
        return False
    if any(type(layer.get_submodule(p)) not in (nn.Linear, LoRALinear) for p in LINEARS):
        return False
    trainable = {id(p) for m in adapters(layer) for p in (m.lora_a, m.lora_b)}
    return all(id(p) in trainable for p in layer.parameters() if p.requires_grad)


def lean_block(layer: TransformerBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """layer(x, cos, sin, 0) for x (bs, T, dim), no KV cache: same value, the backward above.
    Falls back to the layer's own forward where it cannot serve (can_serve)."""
    if not (torch.is_grad_enabled() and can_serve(layer)):
        return layer(x, cos, sin, 0)
    params = [p for m in adapters(layer) for p in (m.lora_a, m.lora_b)]
    return LeanBlock.apply(layer, x, cos, sin, *params)


# ----------------------------------------------------------------------------- the adapters

def drops(m: nn.Module) -> bool:
    """True when m is an adapter that draws a dropout mask in this forward."""
    return isinstance(m, LoRALinear) and m.enabled and m.training and m.dropout > 0


_SELECT_BIT_J_OF_BYTE_J = 0x8040201008040201 - (1 << 64)  # as a (negative) int64


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask -> its bits, eight to a byte (uint8, (ceil(numel / 8),)): an eighth of the bool tensor.

    Eight mask bytes (each 0 or 1) read as one int64 v, byte j holding m_j; v * 0x0102040810204080 puts m_j
    on bit 56 + j and nothing else on bits 56-63 (every product term has a bit of its own, no carries), so
    v * C >> 56 is the byte sum_j m_j 2^j, in one multiply per eight elements. Little-endian byte order
    (x86, ARM); elsewhere the bool mask is kept as it is."""
    if sys.byteorder != "little":
        return mask
    flat = mask.reshape(-1).view(torch.uint8)
    flat = torch.cat((flat, flat.new_zeros(-flat.numel() % 8)))   # pad to whole int64s
    return ((flat.view(torch.int64) * 0x0102040810204080) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """pack_mask's bytes -> the bool mask of `shape`: each byte copied into the eight bytes of an int64
    (b * 0x0101010101010101), byte j then keeping only bit j (& 0x8040201008040201)."""
    if packed.dtype == torch.bool:
        return packed
    spread = (packed.to(torch.int64) * 0x0101010101010101) & _SELECT_BIT_J_OF_BYTE_J
    return spread.view(torch.uint8).ne(0)[:shape.numel()].view(shape)


def as_factor(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 1.0 where True, 0.0 where False, in dtype, by way of uint8: torch converts bool to
    bfloat16 an element at a time, uint8 with vector instructions (a (2048, 1536) mask: 2.6 ms against 0.2 ms
    on a 2-core CPU, measured), and multiplying by a bool mask converts it too (2.2 ms against 0.4 ms).
    Multiplying by it gives the bits multiplying by the bool mask gives. (Under autograd, as in the plain
    step, the bool mask is better: autograd keeps it, a byte an element instead of 2 or 4.)"""
    return mask.view(torch.uint8).to(dtype)


def linear_forward(m: nn.Module, x: torch.Tensor, masks: dict) -> torch.Tensor:
    """m(x), keeping its dropout mask packed (masks[id(m)]): the same draw LoRALinear.forward makes."""
    if not drops(m):
        return m(x)
    mask = m.draw_mask(x)
    masks[id(m)] = pack_mask(mask)
    return m(x, as_factor(mask, x.dtype))


def mask_of(m: nn.Module, x: torch.Tensor, masks: dict) -> torch.Tensor | None:
    """The dropout mask linear_forward's call drew for input x, as 0/1 in x's dtype (as_factor; None where
    m drops nothing), unpacked once for each use below."""
    return as_factor(unpack_mask(masks[id(m)], x.shape), x.dtype) if drops(m) else None


def linear_again(m: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """m(x) once more, with the forward's dropout mask."""
    return m(x) if mask is None else m(x, mask)


def linear_backward(m: nn.Module, x: torch.Tensor, dy: torch.Tensor, mask: torch.Tensor | None,
                    grads: dict) -> torch.Tensor:
    """Gradient of m(x) w.r.t. x, given dy and the forward's dropout mask (None: none); the adapter's
    gradients go to grads[id(param)].

        y = x W^T + (x ⊙ mask) (s A)^T B^T       s = alpha / rank / (1 - p)
        dx = dy W + (dy B (s A)) ⊙ mask
        dB = dy^T z,  z = (x ⊙ mask)(s A)^T      dA = s · (dy B)^T (x ⊙ mask)"""
    base = m.base if isinstance(m, LoRALinear) else m
    dx = dy @ base.weight.to(dy.dtype)                              # (bs, T, in): the frozen weight's part
    if not (isinstance(m, LoRALinear) and m.enabled):
        return dx
    scale = m.scale
    if mask is not None:
        x = x * mask
        scale = scale / (1.0 - m.dropout)
    a = (scale * m.lora_a).to(x.dtype)                             # (rank, in), as LoRALinear.forward
    b = m.lora_b.to(x.dtype)                                       # (out, rank)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])   # (bs*T, in), (bs*T, out)
    dz = dy2 @ b                                                   # (bs*T, rank)
    grads[id(m.lora_b)] = (dy2.T @ (x2 @ a.T)).float()            # (out, rank)
    grads[id(m.lora_a)] = (dz.T @ x2).float() * scale             # (rank, in)
    dx_lora = (dz @ a).view_as(dx)
    return dx.add_(dx_lora if mask is None else dx_lora.mul_(mask))   # in place: fewer fresh pages


# ----------------------------------------------------------------------------- norms, SwiGLU, RoPE

def rmsnorm_backward(norm: RMSNorm, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of norm(x) w.r.t. x: with n = x / rms(x) (fp32), dx = (dn - n · mean(dn · n)) / rms(x)."""
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)  # (bs, T, 1)
    n = x32 * r
    dn = (dy * norm.weight).float()
    return dn.sub_(n.mul_((dn * n).mean(-1, keepdim=True))).mul_(r).type_as(x)  # in place: fewer fresh pages


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of apply_rope: y = x cos + rot(x) sin with rot(x) = [-x2, x1], so dx = dy cos + rot^T(dy sin),
    rot^T(w) = [w2, -w1]."""
    w = dy * sin.to(dy.dtype)
    w1, w2 = w.chunk(2, dim=-1)
    return dy * cos.to(dy.dtype) + torch.cat((w2, -w1), dim=-1)


# ----------------------------------------------------------------------------- attention

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Causal attention of q (bs, n_heads, T, d) over k, v (bs, n_kv_heads, T, d): the value
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) gives, bit for bit, and what
    attention_backward needs: q, k, v, out and the logsumexp of each query's scores. On CPU that function
    runs torch's flash kernel, called here directly for its logsumexp; elsewhere, attention_in_a_graph."""
    if q.device.type != "cpu":
        return attention_in_a_graph(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, (q, k, v, out, lse)


def attention_in_a_graph(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """attention() through the function itself, on leaves of a graph of its own: it keeps the same
    tensors, and attention_backward calls the graph's backward by hand. Returns out and (q, k, v, out)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.detach(), (q, k, v, out)


def attention_backward(kept: tuple, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given d loss / d out (bs, n_heads, T, d) and what attention() kept.

    The CPU kernel's backward runs on k and v repeated to one per query head, and each key/value head's
    gradient is then the sum over its group of query heads. That is faster than the kernel's backward on
    grouped heads (SmolLM2's 9 on 3 heads, 2,048 tokens, bf16, 2 threads: about 84 against 100 ms a layer)
    and no less accurate (tests/test_lean_backward.py compares both with float64)."""
    if len(kept) == 4:                                              # attention_in_a_graph's
        q, k, v, out = kept
        return torch.autograd.grad(out, (q, k, v), dout)
    q, k, v, out, lse = kept
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))  # (bs, n_heads, T, d)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k_rep, v_rep, out, lse, 0.0, True)
    fold = lambda d: d.unflatten(1, (k.shape[1], group)).sum(2)  # noqa: E731  (bs, n_kv_heads, T, d), fp32 sums
    return dq, fold(dk), fold(dv)


# ----------------------------------------------------------------------------- the block

class LeanBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer: TransformerBlock, x, cos, sin, *params):
        attn, ff = layer.attention, layer.feed_forward
        bsz, T, _ = x.shape
        masks = {}
        # attention: the block's own modules, as Attention.forward without a cache
        xn = layer.attention_norm(x)
        q = linear_forward(attn.wq, xn, masks).view(bsz, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = linear_forward(attn.wk, xn, masks).view(bsz, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = linear_forward(attn.wv, xn, masks).view(bsz, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)    # (bs, heads, T, head_dim)
        out, kept = attention(q, k, v)                             # (bs, n_heads, T, d)
        o2 = out.transpose(1, 2).reshape(bsz, T, attn.n_heads * attn.head_dim)
        h = x + linear_forward(attn.wo, o2, masks)
        # feed-forward: FeedForward.forward, its parts kept apart
        hn = layer.ffn_norm(h)
        g = linear_forward(ff.w1, hn, masks)                      # (bs, T, hidden)
        u = linear_forward(ff.w3, hn, masks)
        y = h + linear_forward(ff.w2, F.silu(g) * u, masks)
        ctx.layer, ctx.params, ctx.mask_owners = layer, params, list(masks)
        # the kernel's tensors are saved with the rest, unless they belong to attention_in_a_graph's graph
        ctx.graph = kept if len(kept) == 4 else None
        ctx.save_for_backward(x, cos, sin, h, *masks.values(), *(kept if ctx.graph is None else ()))  # not g, u
        del xn, hn, g, u
        trim_heap()
        return y

    @staticmethod
    def backward(ctx, dy):
        layer = ctx.layer
        attn, ff = layer.attention, layer.feed_forward
        x, cos, sin, h, *rest = ctx.saved_tensors
        masks = dict(zip(ctx.mask_owners, rest))                   # id(adapter) -> its packed dropout mask
        kept = ctx.graph or tuple(rest[len(masks):])               # what attention() kept
        bsz, T, _ = x.shape
        grads = {}
        # feed-forward: y = h + w2(silu(g) * u), g = w1(hn), u = w3(hn), hn = ffn_norm(h)
        hn = layer.ffn_norm(h)
        m1, m3 = mask_of(ff.w1, hn, masks), mask_of(ff.w3, hn, masks)
        g, u = linear_again(ff.w1, hn, m1), linear_again(ff.w3, hn, m3)  # the forward's values, bit for bit
        silu_g = F.silu(g)                                         # the forward's value, bit for bit
        act = silu_g * u                                           # w2's input
        dp = linear_backward(ff.w2, act, dy, mask_of(ff.w2, act, masks), grads)
        dg = torch.ops.aten.silu_backward(dp * u, g)               # (dp u) silu'(g): autograd's own kernel
        du = dp.mul_(silu_g)
        del act, g, u, silu_g, dp
        dhn = linear_backward(ff.w1, hn, dg, m1, grads).add_(linear_backward(ff.w3, hn, du, m3, grads))
        dh = rmsnorm_backward(layer.ffn_norm, h, dhn).add_(dy)
        del hn, m1, m3, dg, du, dhn
        # attention: h = x + wo(attention(rope(wq(xn)), rope(wk(xn)), wv(xn))), xn = attention_norm(x)
        o2 = kept[3].detach().transpose(1, 2).reshape(bsz, T, attn.n_heads * attn.head_dim)  # kept[3]: out
        do2 = linear_backward(attn.wo, o2, dh, mask_of(attn.wo, o2, masks), grads)
        dout = do2.view(bsz, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        dq, dk, dv = attention_backward(kept, dout)
        del ctx.graph, kept, rest, o2, do2, dout                   # (on CPU the saved ones go when this returns)
        dq, dk = rope_backward(dq, cos, sin), rope_backward(dk, cos, sin)
        flat = lambda t: t.transpose(1, 2).reshape(bsz, T, -1)      # noqa: E731  (bs, heads, T, d) -> (bs, T, heads*d)
        xn = layer.attention_norm(x)
        dxn = linear_backward(attn.wq, xn, flat(dq), mask_of(attn.wq, xn, masks), grads)
        for lin, d in ((attn.wk, dk), (attn.wv, dv)):
            dxn.add_(linear_backward(lin, xn, flat(d), mask_of(lin, xn, masks), grads))
        dx = rmsnorm_backward(layer.attention_norm, x, dxn).add_(dh)
        del dxn, dh, xn, dq, dk, dv
        trim_heap()
        return (None, dx, None, None, *(grads.get(id(p)) for p in ctx.params))
