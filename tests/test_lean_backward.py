"""The lean adapter step (lean_backward.lean_block + train_block.HeadLoss) computes what the plain one does:
the same forward bit for bit, the same loss and adapter gradients up to float rounding, the same dropout
masks, the same perplexities, on awkward sizes; and it keeps far fewer bytes for the backward."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from helpers import checksums, tiny_model
import lean_backward
from lean_backward import lean_block, pack_mask, unpack_mask
from lora import add_lora, lora_parameters, lora_targets
from model import rope_cos_sin
from templora import TempLoRAConfig, evaluate
from train_block import HeadLoss, block_loss

# 9 query heads on 3 key/value heads (GQA), head_dim 8, three layers
AWKWARD = dict(dim=72, n_heads=9, n_kv_heads=3, head_dim=8, hidden_dim=100, n_layers=3)


def adapted(targets="all", dropout=0.1, seed=0, own_generator=True, **overrides):
    """A tiny model with a LoRA whose B is not zero (a fresh B = 0 would hide errors in A's gradient)."""
    model = tiny_model(seed, **(AWKWARD | overrides)).requires_grad_(False)
    gen = torch.Generator().manual_seed(1) if own_generator else None
    add_lora(model, 4, 8.0, dropout, lora_targets(targets, model), generator=gen)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, 0.1)
    return model.train(), gen


def loss_and_grads(model, gen, context, block, lean):
    """block_loss and every adapter gradient, with the dropout stream reset to the same state first."""
    if gen is not None:
        gen.manual_seed(7)
    else:
        torch.manual_seed(7)
    for p in lora_parameters(model):
        p.grad = None
    loss = block_loss(model, context, block, lean=lean)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("targets", ["all", "attn", "mlp", "attention.wq,feed_forward.w2"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("own_generator", [True, False])
def test_lean_loss_and_adapter_gradients_equal_the_plain_step(targets, tie, own_generator):
    model, gen = adapted(targets, tie_embeddings=tie, own_generator=own_generator)
    context, block = list(range(5, 40)), list(range(50, 87))      # 35 + 37 tokens: no power of two
    loss, grads = loss_and_grads(model, gen, context, block, lean=True)
    plain_loss, plain_grads = loss_and_grads(model, gen, context, block, lean=False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(plain_grads) > 0
    for g, ref in zip(grads, plain_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_lean_step_without_context_and_without_dropout():
    model, gen = adapted(dropout=0.0)
    block = list(range(3, 30))
    loss, grads = loss_and_grads(model, gen, [], block, lean=True)
    plain_loss, plain_grads = loss_and_grads(model, gen, [], block, lean=False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for g, ref in zip(grads, plain_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_lean_step_in_bfloat16_matches_the_plain_step():
    model, gen = adapted()
    model.to(torch.bfloat16)
    for p in lora_parameters(model):  # the adapter stays fp32 beside a bf16 base, as the CLI runs it
        p.data = p.data.float()
    context, block = list(range(5, 40)), list(range(50, 87))
    loss, grads = loss_and_grads(model, gen, context, block, lean=True)
    plain_loss, plain_grads = loss_and_grads(model, gen, context, block, lean=False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-2, atol=1e-2)
    for g, ref in zip(grads, plain_grads):
        assert g.dtype == torch.float32
        assert (g - ref).norm() <= 0.05 * ref.norm()


def test_lean_forward_is_the_plain_forward_bit_for_bit_and_draws_the_same_masks():
    model, gen = adapted()
    layer = model.layers[1]
    x = torch.randn(1, 29, AWKWARD["dim"], requires_grad=True)
    cos, sin = rope_cos_sin(model.args, 0, 29, "cpu")
    gen.manual_seed(3)
    y = lean_block(layer, x, cos, sin)
    after_lean = gen.get_state()
    y.sum().backward()                                             # drawing the masks again leaves gen alone
    assert torch.equal(gen.get_state(), after_lean)
    gen.manual_seed(3)
    ref = layer(x, cos, sin, 0)
    assert torch.equal(y, ref)
    assert torch.equal(gen.get_state(), after_lean)


def test_head_loss_equals_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    h = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (30,))
    for rows in (1, 7, 30, 64):                                    # a last chunk shorter than the rest, one chunk
        loss = HeadLoss.apply(h, weight, targets, rows)
        (dh,) = torch.autograd.grad(2.5 * loss, h)
        ref = F.cross_entropy(F.linear(h, weight).float(), targets)
        (ref_dh,) = torch.autograd.grad(2.5 * ref, h)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-7)


def test_lean_falls_back_to_autograd_where_something_else_trains():
    model, gen = adapted()
    norm = model.layers[0].ffn_norm.weight.requires_grad_(True)   # a trained norm: not the lean block's case
    context, block = list(range(5, 20)), list(range(30, 45))
    loss, _ = loss_and_grads(model, gen, context, block, lean=True)
    norm_grad, norm.grad = norm.grad.clone(), None
    plain_loss, _ = loss_and_grads(model, gen, context, block, lean=False)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert norm_grad.abs().max() > 0
    torch.testing.assert_close(norm_grad, norm.grad, rtol=1e-4, atol=1e-6)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of fn()."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    assert out.requires_grad
    return sum(storages.values())


def test_lean_step_keeps_less_than_half_the_bytes_for_backward():
    model, gen = adapted(n_layers=4, hidden_dim=192)
    context, block = list(range(1, 200)), list(range(200, 250))
    lean = saved_bytes(lambda: block_loss(model, context, block, lean=True))
    plain = saved_bytes(lambda: block_loss(model, context, block, lean=False))
    assert lean < 0.5 * plain, (lean, plain)


def test_lean_step_keeps_neither_the_gate_nor_the_up():
    """What the lean step keeps grows with the feed-forward's width by the down projection's packed dropout
    mask only (one bit per element): g and u are computed again."""
    context, block = list(range(1, 200)), list(range(200, 250))
    kept = [saved_bytes(lambda: block_loss(adapted(n_layers=4, hidden_dim=hidden)[0], context, block))
            for hidden in (96, 384)]
    plain = [saved_bytes(lambda: block_loss(adapted(n_layers=4, hidden_dim=hidden)[0], context, block, lean=False))
             for hidden in (96, 384)]
    tokens = len(context) + len(block) - 1
    assert kept[1] - kept[0] == 4 * tokens * (384 - 96) // 8, kept
    assert plain[1] - plain[0] > 8 * (kept[1] - kept[0])            # where autograd keeps them, they show


@pytest.mark.parametrize("shape", [(1,), (3, 13), (1, 29, 72), (2, 5, 100), (1, 8, 8)])
def test_packed_masks_unpack_to_the_same_masks(shape):
    torch.manual_seed(sum(shape))
    for p in (0.05, 0.5, 0.95):
        mask = torch.rand(shape) >= p
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_mask(packed, mask.shape), mask)
    assert torch.equal(unpack_mask(pack_mask(torch.ones(shape, dtype=torch.bool)), torch.Size(shape)),
                       torch.ones(shape, dtype=torch.bool))


def test_trim_heap_trims_once_the_held_pages_have_grown_by_the_bound(monkeypatch):
    held, trims = [1000], []
    monkeypatch.setattr(lean_backward, "held_free", lambda: held[0])
    monkeypatch.setattr(lean_backward, "release_memory", lambda: (trims.append(held[0]), held.__setitem__(0, 100)))
    monkeypatch.setattr(lean_backward, "TRIM_ABOVE", 500)
    monkeypatch.setattr(lean_backward, "_held_after_trim", 0)
    lean_backward.trim_heap()                                      # 1000 held, 0 after the last trim: trim
    assert trims == [1000] and lean_backward._held_after_trim == 100
    held[0] = 550
    lean_backward.trim_heap()                                      # grown by 450 only
    assert trims == [1000]
    held[0] = 650
    lean_backward.trim_heap()                                      # grown by 550
    assert trims == [1000, 650]


def test_evaluate_gives_the_same_perplexities_and_leaves_the_base_weights_alone():
    model = tiny_model(0, **AWKWARD).requires_grad_(False)
    before = checksums(model)
    ids = [(7 * i + 3) % 300 for i in range(150)]
    cfg = TempLoRAConfig(delta=40, context=30, window=96, keep=48, rank=4, lr=1e-2, epochs=2)
    lean = evaluate(model, ids, cfg)
    plain = evaluate(model, ids, cfg, loss_fn=partial(block_loss, lean=False))
    assert lean["ppl_templora"] != lean["ppl_base"]                 # the adapter did train
    assert lean["ppl_base"] == plain["ppl_base"]
    assert lean["ppl_templora"] == pytest.approx(plain["ppl_templora"], rel=1e-5)
    assert checksums(model) == before


@pytest.mark.parametrize("heads,kv_heads,T,bs", [(9, 3, 37, 1), (4, 4, 1, 1), (8, 2, 300, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_the_function_and_its_backward_is_as_close_to_float64(heads, kv_heads, T, bs, dtype):
    """lean_backward.attention: F.scaled_dot_product_attention's value bit for bit; attention_backward's
    gradients (the CPU kernel's backward on repeated k and v) as close to float64 as autograd's through
    the function, and the graph form (what runs off CPU) equal to autograd's."""
    torch.manual_seed(heads + T)
    q = torch.randn(bs, T, heads, 16).transpose(1, 2).to(dtype)    # strided like the model's q
    k, v = (torch.randn(bs, kv_heads, T, 16).to(dtype) for _ in range(2))
    dout = torch.randn(bs, T, heads, 16).to(dtype).transpose(1, 2)  # and like the backward's dout
    out, kept = lean_backward.attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    grads = lean_backward.attention_backward(kept, dout)

    def autograd(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(o, leaves, dout.to(dt))
    exact, through_function = autograd(torch.float64), autograd(dtype)
    graph_out, graph_kept = lean_backward.attention_in_a_graph(q, k, v)
    assert torch.equal(graph_out, out)
    for g, f, e, gg in zip(grads, through_function, exact, lean_backward.attention_backward(graph_kept, dout)):
        assert g.dtype == dtype and g.shape == e.shape
        assert torch.equal(gg, f)
        err, err_function = ((t.double() - e).abs().max().item() for t in (g, f))
        if dtype == torch.float32:
            assert err <= 1e-5 * e.abs().max().item() + 1e-6          # + : T = 1 has dq = 0
        else:
            assert err <= 1.5 * err_function + 1e-3 * e.abs().max().item()
