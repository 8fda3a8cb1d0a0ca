"""templora.py: the cache policy (reuse, recompute), the effect itself, the eval numbers, robustness."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from helpers import checksums, tiny_model
from lora import LoRALinear, add_lora, lora_parameters, remove_lora
from model import KVCache
from templora import (TempLoRAConfig, Window, add_adapter, check_config, evaluate, generate_templora,
                      score_block)
from train_block import make_optimizer, train_block

SMALL = dict(delta=16, context=32, window=48, keep=24, rank=8, alpha=16, dropout=0.0, lr=1e-2, epochs=2)


def test_reused_cache_equals_stale_keys_for_old_tokens_and_new_adapter_for_new_ones():
    """Reference without any cache: one full forward in which each LoRA applies the adapter that was
    current when that position was encoded (old adapter before n_old, new one after)."""
    model = tiny_model()
    add_lora(model, rank=4, alpha=8, dropout=0.0)
    ids = torch.randint(0, 300, (1, 30))
    n_old = 18
    cache = KVCache(model.args, 1, 30)
    with torch.no_grad():
        model(ids[:, :n_old], 0, cache)  # old tokens, encoded by the old adapter (B = 0)
    old = {m: (m.lora_a.detach().clone(), m.lora_b.detach().clone())
           for m in model.modules() if isinstance(m, LoRALinear)}
    train_block(model, make_optimizer(lora_parameters(model), 1e-2), [], ids[0, :n_old].tolist(), lr=1e-2)  # adapter changes
    with torch.no_grad():
        got = model(ids[:, n_old:], n_old, cache)  # new tokens reuse the stale cache

        def mixed_forward(m):
            def forward(x):  # x (1, seq, in)
                delta_old = m.scale * (x @ old[m][0].T) @ old[m][1].T
                delta_new = m.scale * (x @ m.lora_a.T) @ m.lora_b.T
                is_old = (torch.arange(x.shape[1]) < n_old)[None, :, None]
                return m.base(x) + torch.where(is_old, delta_old, delta_new)
            return forward
        for m in old:
            m.forward = mixed_forward(m)
        expected = model(ids)[:, n_old:]
        stale_free = None
        for m in old:
            del m.forward  # back to the class's forward: the new adapter everywhere
        stale_free = model(ids)[:, n_old:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - stale_free).abs().max() > 1e-4  # staleness is real: the check could fail


def test_recompute_at_the_window_boundary_is_a_fresh_forward_of_the_last_keep_tokens():
    model = tiny_model()
    add_lora(model, rank=4, alpha=8, dropout=0.0)
    opt = make_optimizer(lora_parameters(model), 1e-2)
    ids = torch.randint(0, 300, (120,)).tolist()
    window = Window(model, size=48, keep=24)
    delta, recomputed_at = 16, []
    for start in range(1, 113, delta):
        end = start + delta
        before = window.recomputes
        nll = score_block(model, window, ids, start, end)
        if window.recomputes > before:
            recomputed_at.append(start)
            # the cache now holds exactly ids[start - keep : end - 1], each token once
            assert window.start == start - 24 and window.end == end - 1 and window.length == 24 + delta - 1
            with torch.no_grad():
                fresh = model(torch.tensor([ids[start - 24: end - 1]]))[0, -delta:]
                expected = F.cross_entropy(fresh, torch.tensor(ids[start:end]), reduction="sum").item()
                keys = KVCache(model.args, 1, 48)
                model(torch.tensor([ids[start - 24: end - 1]]), 0, keys)
            assert nll == pytest.approx(expected, rel=1e-5)
            n = window.length
            torch.testing.assert_close(window.cache.k[1][:, :, :n], keys.k[1][:, :, :n])
        else:
            assert window.end == end - 1  # reuse: only the new tokens were encoded
        train_block(model, opt, ids[max(0, start - 32):start], ids[start:end], lr=1e-2)
    assert len(recomputed_at) >= 2


def test_training_on_repeated_text_lowers_the_nll_of_later_repeats():
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    passage = torch.randint(0, 300, (64,)).tolist()
    ids = passage * 4  # a random model cannot copy from its cache: only the adapter can remember
    r = evaluate(model, ids, TempLoRAConfig(**(SMALL | {"delta": 64, "window": 96, "keep": 16, "context": 16})))
    ratios = [c["nll_templora"] / c["nll_base"] for c in r["chunks"]]
    assert ratios[0] == pytest.approx(1.0, rel=1e-6)  # nothing learned before the first block
    assert all(x < 0.97 for x in ratios[1:])          # every later repeat is predicted better...
    assert ratios[1] > ratios[2] > ratios[3]           # ...and better with each exposure
    assert r["ppl_templora"] < r["ppl_base"]


def test_eval_results_follow_the_documented_format():
    model = tiny_model()
    ids = torch.randint(0, 300, (90,)).tolist()
    r = evaluate(model, ids, TempLoRAConfig(**SMALL))
    n = sum(c["tokens"] for c in r["chunks"])
    assert n == len(ids) - 1 == r["scored_tokens"]
    assert [c["start"] for c in r["chunks"]] == list(range(1, 90, 16))
    assert r["ppl_base"] == pytest.approx(math.exp(sum(c["nll_base"] for c in r["chunks"]) / n), rel=1e-12)
    assert r["ppl_templora"] == pytest.approx(math.exp(sum(c["nll_templora"] for c in r["chunks"]) / n), rel=1e-12)
    assert r["config"]["delta"] == 16 and "total_s" in r["timings"]
    # base NLL of a block equals a direct windowed computation: sanity of the scoring itself
    c = r["chunks"][0]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:17]]))[0, :16]
    assert c["nll_base"] == pytest.approx(F.cross_entropy(logits, torch.tensor(ids[1:17]), reduction="sum").item(), rel=1e-5)


def test_no_cache_reuse_recomputes_after_every_update_and_changes_only_templora_scores():
    model = tiny_model()
    ids = torch.randint(0, 300, (90,)).tolist()
    reuse = evaluate(model, ids, TempLoRAConfig(**SMALL))
    fresh = evaluate(model, ids, TempLoRAConfig(**SMALL, cache_reuse=False))
    assert [c["nll_base"] for c in reuse["chunks"]] == pytest.approx([c["nll_base"] for c in fresh["chunks"]])
    assert reuse["chunks"][2]["nll_templora"] != pytest.approx(fresh["chunks"][2]["nll_templora"], rel=1e-9)


def test_generate_runs_blocks_recomputes_and_leaves_the_base_untouched():
    model = tiny_model()
    before = checksums(model)
    lines = []
    out = generate_templora(model, [1, 2, 3, 4, 5], 100, TempLoRAConfig(**SMALL), log=lines.append)
    assert len(out) == 100
    assert sum("train:" in s for s in lines) == math.ceil(100 / 16)
    assert any("recompute" in s for s in lines)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert checksums(model) == before


def test_generate_without_templora_is_plain_windowed_greedy_decoding():
    model = tiny_model()
    out = generate_templora(model, [1, 2, 3], 20, TempLoRAConfig(**(SMALL | {"templora": False})), log=lambda s: None)
    seq = [1, 2, 3]
    with torch.no_grad():  # window 48 never fills here, so it is plain greedy decoding
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_the_adapter_is_gone_after_an_exception_mid_run(exc):
    model = tiny_model()
    before = checksums(model)

    def log(line):
        if "[block 1] train" in line:
            raise exc("stop here")
    with pytest.raises(exc):
        generate_templora(model, [1, 2, 3], 64, TempLoRAConfig(**SMALL), log=log)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert checksums(model) == before


@pytest.mark.parametrize("knobs, message", [
    (dict(delta=48), "--delta (48) must be smaller than --window (48)"),
    (dict(keep=40), "--keep (40) + --delta (16) must fit in --window (48)"),
    (dict(window=512, keep=24), "--window (512) exceeds the model's max_position_embeddings (256)"),
    (dict(context=250), "--context (250) + --delta (16) exceeds"),
    (dict(rank=0), "--rank must be positive"),
    (dict(epochs=0), "--epochs must be >= 1"),
])
def test_invalid_knobs_are_rejected_with_the_flag_named(knobs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(TempLoRAConfig(**(SMALL | knobs)), tiny_model())


def test_a_text_shorter_than_one_block_is_rejected():
    with pytest.raises(ValueError, match="fewer than one block"):
        evaluate(tiny_model(), list(range(10)), TempLoRAConfig(**SMALL))


def test_an_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_templora(tiny_model(), [], 10, TempLoRAConfig(**SMALL))


def test_same_seed_same_text():
    cfg = TempLoRAConfig(**(SMALL | {"dropout": 0.1}))
    a = generate_templora(tiny_model(), [7, 8, 9], 40, cfg, temperature=1.0, top_p=0.9, log=lambda s: None)
    b = generate_templora(tiny_model(), [7, 8, 9], 40, cfg, temperature=1.0, top_p=0.9, log=lambda s: None)
    assert a == b


def test_base_only_eval_scores_the_same_as_the_base_column_of_a_full_eval():
    model = tiny_model()
    ids = torch.randint(0, 300, (90,)).tolist()
    full = evaluate(model, ids, TempLoRAConfig(**SMALL))
    base = evaluate(model, ids, TempLoRAConfig(**(SMALL | {"templora": False})))
    assert base["ppl_templora"] is None and "nll_templora" not in base["chunks"][0]
    assert [c["nll_base"] for c in base["chunks"]] == pytest.approx([c["nll_base"] for c in full["chunks"]], rel=1e-6)


def test_a_longer_base_window_sees_more_context():
    model = tiny_model()
    ids = torch.randint(0, 300, (200,)).tolist()
    short = evaluate(model, ids, TempLoRAConfig(**(SMALL | {"templora": False})))
    long = evaluate(model, ids, TempLoRAConfig(**(SMALL | {"templora": False})), base_window=192)
    assert long["recomputes"]["base"] < short["recomputes"]["base"]
    assert long["config"]["base_window"] == 192


def test_the_loops_leave_the_global_random_state_alone_and_depend_only_on_the_seed():
    model = tiny_model()
    ids = torch.randint(0, 300, (90,)).tolist()
    cfg = TempLoRAConfig(**(SMALL | {"dropout": 0.1}))  # dropout: the adapter draws random masks every step
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluate(model, ids, cfg)
    text = generate_templora(model, [1, 2, 3], 20, cfg, temperature=1.0, log=lambda s: None)
    assert torch.equal(torch.get_rng_state(), state)  # nothing was drawn from the global generator
    torch.manual_seed(999)  # another global seed, the same numbers
    assert [c["nll_templora"] for c in evaluate(model, ids, cfg)["chunks"]] == [c["nll_templora"] for c in first["chunks"]]
    assert generate_templora(model, [1, 2, 3], 20, cfg, temperature=1.0, log=lambda s: None) == text


def test_the_loops_remove_only_the_adapter_they_added():
    model = tiny_model()
    mine = add_lora(model, rank=2, alpha=2, dropout=0.0)  # the caller's own adapter
    ids = torch.randint(0, 300, (90,)).tolist()
    evaluate(model, ids, TempLoRAConfig(**(SMALL | {"templora": False})))
    generate_templora(model, [1, 2, 3], 20, TempLoRAConfig(**(SMALL | {"templora": False})), log=lambda s: None)
    assert [m for m in model.modules() if isinstance(m, LoRALinear)] == mine


@pytest.mark.parametrize("base_window", [16, 512])
def test_a_bad_base_window_is_rejected_with_the_flag_named(base_window):
    with pytest.raises(ValueError, match=re.escape(f"--base-window ({base_window}) must be larger than --delta (16)")):
        evaluate(tiny_model(), list(range(90)), TempLoRAConfig(**SMALL), base_window=base_window)


def test_make_optimizer_takes_parameters_not_a_model():
    model = tiny_model()
    add_lora(model, rank=2, alpha=2)
    with pytest.raises(TypeError, match="lora_parameters"):
        make_optimizer(model)
    with pytest.raises(ValueError, match="no parameters to train"):
        make_optimizer([])


def block_lines(lines: list[str]) -> dict[int, list[str]]:
    """generate_templora's log, by block: {0: ["generate: ...", "train: ..."], 1: ["reuse: ...", ...]}."""
    out: dict[int, list[str]] = {}
    for line in lines:
        if m := re.match(r"\[block (\d+)\] (.*)", line):
            out.setdefault(int(m[1]), []).append(m[2])
    return out


@pytest.mark.parametrize("cache_reuse", [True, False])
def test_generate_logs_a_reuse_only_when_the_cache_is_reused_and_a_recompute_whenever_it_is_rebuilt(cache_reuse):
    lines = []
    generate_templora(tiny_model(), [1, 2, 3, 4, 5], 100, TempLoRAConfig(**SMALL, cache_reuse=cache_reuse),
                      log=lines.append)
    blocks = block_lines(lines)
    assert len(blocks) == math.ceil(100 / 16)
    assert not any(s.startswith(("reuse", "recompute")) for s in blocks[0])  # the first block: an empty cache
    for i in range(1, len(blocks)):
        kinds = [s.split(":")[0] for s in blocks[i] if s.startswith(("reuse", "recompute"))]
        assert len(kinds) == 1, blocks[i]
        if not cache_reuse:
            assert kinds == ["recompute"]  # every update invalidates the cache: it is rebuilt, never reused
    if cache_reuse:
        kinds = [s.split(":")[0] for i in range(1, len(blocks)) for s in blocks[i] if s.startswith(("reuse", "recompute"))]
        assert "reuse" in kinds and "recompute" in kinds  # W = 48 overflows now and then
    assert not any("K/V of 0 tokens" in s for s in lines)


@pytest.mark.parametrize("cache_reuse", [True, False])
def test_eval_counts_a_recompute_for_every_block_whose_cache_was_rebuilt(cache_reuse):
    ids = torch.randint(0, 300, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    r = evaluate(tiny_model(), ids, TempLoRAConfig(**SMALL, cache_reuse=cache_reuse))
    flags = [c["recomputed"] for c in r["chunks"]]
    assert flags[0] is False  # the first block starts from an empty cache: nothing is rebuilt
    if cache_reuse:  # Δ = 16 in W = 48: a block overflows the window now and then, and only then
        assert 0 < sum(flags) < len(flags) - 1
    else:
        assert all(flags[1:])
    assert r["recomputes"]["templora"] == sum(flags)


def test_window_invalidate_makes_the_next_block_a_recompute_of_the_same_tokens():
    model = tiny_model()
    window = Window(model, 48, 24)
    window.advance(20)
    window.invalidate()
    assert window.make_room(21, 8) and (window.start, window.length, window.recomputes) == (0, 0, 1)
    window.advance(20)
    assert not window.make_room(21, 8)  # not invalidated again: reused


def test_targets_put_the_adapter_on_the_named_linears_only_and_are_recorded():
    model = tiny_model()
    ids = torch.randint(0, 300, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    args = model.args
    attn = evaluate(model, ids, TempLoRAConfig(**SMALL, targets="attn"))
    paths = evaluate(model, ids, TempLoRAConfig(**SMALL, targets="attention.wq,attention.wv"))
    every = evaluate(model, ids, TempLoRAConfig(**SMALL))
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    r = SMALL["rank"]
    # each adapter is A (r, in) and B (out, r): r * (in + out) per linear and layer
    assert attn["adapter_parameters"] == args.n_layers * r * ((args.dim + q) * 2 + (args.dim + kv) * 2)
    assert paths["adapter_parameters"] == args.n_layers * r * ((args.dim + q) + (args.dim + kv))
    assert every["adapter_parameters"] == attn["adapter_parameters"] + args.n_layers * r * 3 * (args.dim + args.hidden_dim)
    assert (attn["config"]["targets"], every["config"]["targets"]) == ("attn", "all")
    assert attn["chunks"][-1]["nll_templora"] != pytest.approx(every["chunks"][-1]["nll_templora"], rel=1e-6)
    assert attn["chunks"][0]["nll_templora"] == every["chunks"][0]["nll_templora"]  # before training: the base


@pytest.mark.parametrize("targets, message", [("attention.nope", "'attention.nope' is not a module of a block"),
                                              ("attention", "'attention' is a Attention, not an nn.Linear"),
                                              (",", "no module named")])
def test_bad_targets_are_rejected_naming_the_flag(targets, message):
    with pytest.raises(ValueError, match=re.escape(f"--targets {targets}: {message}")):
        check_config(TempLoRAConfig(**SMALL, targets=targets), tiny_model())


def test_alpha_defaults_to_the_rank_so_a_rank_change_keeps_the_scale_at_1():
    model = tiny_model()
    ids = list(range(40))
    for rank in (2, 8):
        knobs = SMALL | {"rank": rank}
        del knobs["alpha"]
        r = evaluate(model, ids, TempLoRAConfig(**knobs))
        assert r["config"]["alpha"] == rank and r["config"]["rank"] == rank
    for rank in (2, 8):
        wrappers = add_adapter(model, TempLoRAConfig(rank=rank))
        assert {w.scale for w in wrappers} == {1.0}
        remove_lora(model, wrappers)
