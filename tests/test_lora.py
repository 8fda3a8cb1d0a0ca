"""lora.py and train_block.py: identity at init, a base model that never changes, the loss, the gradients."""

import pytest
import torch
import torch.nn.functional as F

from helpers import checksums, tiny_model
from lean_backward import as_factor
from lora import LoRALinear, add_lora, lora_parameters, remove_lora, reset_lora
from train_block import block_loss, make_optimizer, train_block


def test_fresh_adapter_leaves_logits_bit_identical():
    model = tiny_model()
    tokens = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        before = model(tokens)
        wrappers = add_lora(model, rank=8, alpha=16)
        after = model(tokens)
    assert len(wrappers) == 7 * model.args.n_layers  # q k v o, gate up down of every block
    assert torch.equal(before, after)


def test_bf16_base_with_fp32_adapter_is_identity_at_init():
    model = tiny_model().to(torch.bfloat16)
    tokens = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        before = model(tokens)
        add_lora(model, rank=4, alpha=4)
        assert all(p.dtype == torch.float32 for p in lora_parameters(model))
        assert torch.equal(before, model(tokens))


def test_training_then_removal_leaves_base_parameters_bit_identical():
    model = tiny_model()
    base_modules = [layer.attention.wq for layer in model.layers]
    before = checksums(model)
    add_lora(model, rank=8, alpha=16, dropout=0.1)
    opt = make_optimizer(lora_parameters(model), lr=1e-2)
    ids = torch.randint(0, 300, (40,)).tolist()
    losses = train_block(model, opt, ids[:24], ids[24:], lr=1e-2, epochs=3)
    assert losses[-1] < losses[0]  # it did train
    assert any(p.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear) for p in [m.lora_b])
    remove_lora(model)
    assert checksums(model) == before
    assert [layer.attention.wq for layer in model.layers] == base_modules  # the very same objects
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_only_adapter_tensors_receive_gradients():
    model = tiny_model()
    model.requires_grad_(False)  # as load_model leaves it
    add_lora(model, rank=4, alpha=8)
    ids = torch.randint(0, 300, (20,)).tolist()
    block_loss(model, ids[:10], ids[10:]).backward()
    adapter = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0 or "lora_a" in name, name
        else:
            assert p.grad is None, name
    # with B = 0 the gradient reaches B first; A gets none until B moves
    assert all(m.lora_b.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("n_context", [0, 9])
def test_block_loss_is_cross_entropy_over_block_tokens_only(n_context):
    model = tiny_model()
    add_lora(model, rank=4, alpha=8, dropout=0.0)
    for m in model.modules():  # a non-trivial adapter, so the check covers the LoRA path too
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.05)
    ids = torch.randint(0, 300, (n_context + 12,)).tolist()
    context, block = ids[:n_context], ids[n_context:]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]  # (seq, vocab): plain full forward
        first = max(n_context - 1, 0)  # logits at position i predict token i + 1
        expected = F.cross_entropy(logits[first:-1], torch.tensor(ids[first + 1:]))
        got = block_loss(model, context, block)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    opt = make_optimizer(lora_parameters(model), lr=1e-3)
    losses = train_block(model, opt, context, block, lr=1e-3, epochs=1)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_non_finite_loss_skips_the_update():
    model = tiny_model()
    add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        model.layers[0].attention.wq.base.weight[0, 0] = float("nan")  # poison the forward
    opt = make_optimizer(lora_parameters(model), lr=1e-2)
    before = [p.clone() for p in lora_parameters(model)]
    ids = list(range(30))
    losses = train_block(model, opt, ids[:10], ids[10:], lr=1e-2, epochs=2)
    assert all(x != x for x in losses)  # NaN reported
    assert all(torch.equal(a, b) for a, b in zip(before, lora_parameters(model)))  # nothing applied


def test_reset_makes_the_adapter_the_identity_again():
    model = tiny_model()
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        base = model(tokens)
    add_lora(model, rank=4, alpha=8)
    train_block(model, make_optimizer(lora_parameters(model), 1e-2), [], tokens[0].tolist(), lr=1e-2)
    with torch.no_grad():
        assert not torch.equal(model(tokens), base)
        reset_lora(model)
        assert torch.equal(model(tokens), base)


def test_invalid_rank_and_double_adapter_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="rank must be positive"):
        add_lora(model, rank=0)
    remove_lora(model)
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(model, rank=2)


def test_adapter_dropout_is_inverted_dropout():
    torch.manual_seed(0)
    m = LoRALinear(torch.nn.Linear(8, 4, bias=False), rank=2, alpha=2, dropout=0.3)
    torch.nn.init.normal_(m.lora_b)
    x = torch.ones(100_000, 8)
    with torch.no_grad():
        delta_eval = (m(x) - m.base(x)).mean(0)
        m.train()
        delta_train = m(x) - m.base(x)
    # one sample's delta comes from its kept inputs: compare the mean, which dropout must preserve
    torch.testing.assert_close(delta_train.mean(0), delta_eval, rtol=0.02, atol=1e-3)
    assert delta_train.std(0).min() > 0  # and it really is random per sample


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_the_dropout_mask_keeps_each_input_with_probability_one_minus_p(p):
    m = LoRALinear(torch.nn.Linear(8, 4, bias=False), rank=2, alpha=2, dropout=p,
                   generator=torch.Generator().manual_seed(1))
    x = torch.empty(999, 1001)                                     # odd sizes: the last 64-bit draw is half used
    keep = m.draw_mask(x)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    flat = keep.reshape(-1).double()
    # all, and each half of the 64-bit draws (even and odd positions), within 5 standard deviations of 1 - p
    for part in (flat, flat[0::2], flat[1::2]):
        sd = ((1 - p) * p / part.numel()) ** 0.5
        assert abs(part.mean().item() - (1 - p)) < 5 * sd
    # neighbours are independent: P(both kept) = (1 - p)^2
    both = (flat[:-1] * flat[1:]).mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / flat.numel()) ** 0.5
    assert not torch.equal(m.draw_mask(x), keep)                  # the next draw is another one


def test_dropout_p_is_kept_to_two_to_the_minus_32_and_checked():
    x = torch.empty(3, 1001)
    m = LoRALinear(torch.nn.Linear(8, 4, bias=False), 2, 2, dropout=0.05, generator=torch.Generator().manual_seed(3))
    bits = torch.empty(1502, dtype=torch.int64).random_(-2 ** 63, None, generator=torch.Generator().manual_seed(3))
    u = bits.view(torch.int32)[:3003].view(3, 1001)            # the 32-bit integers the mask compares
    m.generator.manual_seed(3)                                 # A's init drew from it too
    assert torch.equal(m.draw_mask(x), u >= int(0.05 * 2 ** 32) - 2 ** 31)
    x = torch.empty(100_000)
    drop_all_but = LoRALinear(torch.nn.Linear(8, 4, bias=False), 2, 2, dropout=1 - 2 ** -40)
    assert not drop_all_but.draw_mask(x).any()                    # P(keep) = 2^-32
    tiny = LoRALinear(torch.nn.Linear(8, 4, bias=False), 2, 2, dropout=2 ** -40)
    assert tiny.draw_mask(x).all()                                # floor(2^-40 * 2^32) = 0: nothing dropped
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            LoRALinear(torch.nn.Linear(8, 4, bias=False), 2, 2, dropout=p)


def test_a_given_dropout_mask_is_the_one_the_adapter_would_draw():
    m = LoRALinear(torch.nn.Linear(9, 5, bias=False), rank=3, alpha=6, dropout=0.2,
                   generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(m.lora_b)
    x = torch.randn(2, 7, 9)
    m.train()
    m.generator.manual_seed(4)
    mask = m.draw_mask(x)
    assert mask.dtype == torch.bool and mask.shape == x.shape and 0 < mask.sum() < mask.numel()
    m.generator.manual_seed(4)
    assert torch.equal(m(x, mask), m(x))                       # the same draw, the same output
    assert not torch.equal(m(x, torch.ones_like(mask)), m(x, mask))
    m.eval()
    with pytest.raises(ValueError, match="drops nothing"):
        m(x, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_the_bool_mask_for_autograd_and_multiplies_by_its_factor_otherwise(dtype):
    """Where autograd records x * mask it keeps the mask as drawn: a bool, a byte an element, not x's width;
    the lean step's factor in x's dtype (lean_backward.as_factor) gives the same bits."""
    m = LoRALinear(torch.nn.Linear(9, 5, bias=False), rank=3, alpha=6, dropout=0.2,
                   generator=torch.Generator().manual_seed(0)).to(dtype).train()
    torch.nn.init.normal_(m.lora_b)
    x = torch.randn(2, 7, 9, dtype=dtype)
    mask = m.draw_mask(x)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = m(x.requires_grad_(), mask)
    assert any(t.dtype == torch.bool and t.shape == x.shape for t in kept)
    assert not any(t.dtype == dtype and t.shape == x.shape and torch.equal(t, mask.to(dtype)) for t in kept)
    with torch.no_grad():
        assert torch.equal(m(x, mask), y)
    assert torch.equal(as_factor(mask, dtype), mask.to(dtype))
