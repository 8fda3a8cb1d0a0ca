"""methods/supra.py: the three forms of SUPRA's linear attention agree, its decay is ALiBi's for any head
count, the state replaces the KV cache (generation, the protocol), and the training recipes and checkpoints
do what they say: the GroupNorm starts on the softmax output's scale, and the attention transfer and the
uptraining lower the held-out next-token loss."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import checksums, tiny_model
from lora import add_lora, remove_lora
from methods import supra
from methods.supra import (LinearAttention, RecurrentState, alibi_slopes, chunked, linearize, parallel, recurrent,
                           score_block)
from model import apply_rope, generate, rope_cos_sin
from protocol import evaluate_blocks

NINE_HEADS = dict(n_heads=9, n_kv_heads=9, head_dim=8, dim=48)
NINE_HEADS_GQA = dict(n_heads=9, n_kv_heads=3, head_dim=8, dim=48)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 8, 9, 12, 16, 24])
def test_slopes_are_alibi_for_any_head_count(n):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    # BLOOM's ALiBi: the bias of key position 1 is the slope of each head
    expected = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float64)[:, 0, 1]
    torch.testing.assert_close(torch.tensor(alibi_slopes(n), dtype=torch.float64), expected)


def test_slopes_for_nine_heads_are_the_eight_head_sequence_then_the_first_in_between_slope():
    # ALiBi's rule written out: heads 1..8 get 2^-1 .. 2^-8; the ninth gets 2^-0.5, between 1 and 2^-1
    assert alibi_slopes(9) == pytest.approx([2.0 ** -i for i in range(1, 9)] + [2.0 ** -0.5])


def _qkv(H=9, T=37, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, H, T, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])
def test_parallel_recurrent_and_chunked_forms_agree(chunk):
    q, k, v = _qkv()  # 9 heads, 37 tokens: not a multiple of any chunk but 1 and 37
    log_gamma = -torch.tensor(alibi_slopes(9), dtype=torch.float64)
    empty = torch.zeros(2, 9, 8, 8, dtype=torch.float64)
    o_par = parallel(q, k, v, log_gamma)
    o_rec, s_rec = recurrent(q, k, v, log_gamma, empty)
    o_chk, s_chk = chunked(q, k, v, log_gamma, empty, chunk)
    torch.testing.assert_close(o_rec, o_par)
    torch.testing.assert_close(o_chk, o_par)
    torch.testing.assert_close(s_chk, s_rec)
    # from a state carried in: recurrent and chunked still agree, outputs and the state after
    start = torch.randn(2, 9, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o_rec, s_rec = recurrent(q, k, v, log_gamma, start)
    o_chk, s_chk = chunked(q, k, v, log_gamma, start, chunk)
    torch.testing.assert_close(o_chk, o_rec)
    torch.testing.assert_close(s_chk, s_rec)


def _linearised(seed=0, chunk=8, **config):
    model = tiny_model(seed, **config)
    linearize(model, chunk)
    with torch.no_grad():  # move φ and the norm away from their identity-like start, so every piece is tested
        for layer in model.layers:
            for p in (*layer.attention.phi.parameters(), *layer.attention.group_norm.parameters()):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def _set_form(model, form):
    for layer in model.layers:
        layer.attention.form = form


@pytest.mark.parametrize("config", [NINE_HEADS, NINE_HEADS_GQA], ids=["9_heads", "9_heads_gqa_3_kv"])
def test_linearised_model_gives_the_same_logits_in_every_form(config):
    model = _linearised(**config)
    tokens = torch.randint(0, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        for form in supra.FORMS:
            _set_form(model, form)
            logits[form] = model(tokens)
    torch.testing.assert_close(logits["chunked"], logits["parallel"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["recurrent"], logits["parallel"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [NINE_HEADS, NINE_HEADS_GQA], ids=["9_heads", "9_heads_gqa_3_kv"])
def test_state_carried_over_uneven_pieces_equals_one_forward_over_the_whole_text(config):
    model = _linearised(**config)
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    state, pieces, pos = RecurrentState(model), [], 0
    with torch.no_grad():
        whole = model(tokens)
        for n in (13, 1, 9, 17):  # chunk 8: none of them a multiple
            pieces.append(model(tokens[:, pos:pos + n], pos, state))
            pos += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_the_state_equals_the_parallel_forward():
    model = _linearised(**NINE_HEADS_GQA)
    prompt = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(3)).tolist()[0]
    new = generate(model, RecurrentState(model), prompt, 0, 12)  # prefill (chunked) then one step per token
    _set_form(model, "parallel")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == new
    # and the logits of every decoding step, one token at a time through the state
    _set_form(model, "chunked")
    state, stepped = RecurrentState(model), []
    with torch.no_grad():
        for pos, t in enumerate(prompt + new):
            stepped.append(model(torch.tensor([[t]]), pos, state)[0, 0])
    torch.testing.assert_close(torch.stack(stepped), logits, atol=1e-5, rtol=1e-5)


def test_scoring_block_by_block_with_the_state_equals_one_forward_with_no_window():
    model = _linearised(**NINE_HEADS)
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    state = RecurrentState(model)
    r = evaluate_blocks(ids, 16, lambda i, s, e: {"nll_linear": score_block(model, state, ids, s, e)})
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]),
                                                reduction="sum").item()
    assert r["scored_tokens"] == 69 and state.length == 69  # every token but the last was fed
    assert r["ppl_linear"] == pytest.approx(math.exp(nll / 69), rel=1e-5)


def test_linearize_reuses_the_pretrained_linears_and_lora_still_wraps_them():
    model = tiny_model(**NINE_HEADS_GQA)
    before = [(l.attention.wq, l.attention.wk, l.attention.wv, l.attention.wo) for l in model.layers]
    teachers = linearize(model)
    for layer, teacher, linears in zip(model.layers, teachers, before):
        assert isinstance(layer.attention, LinearAttention)
        assert (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo) == linears
        assert teacher.wq is linears[0]
    tokens = torch.randint(0, 300, (1, 21))
    with torch.no_grad():
        plain = model(tokens)
        wrappers = add_lora(model, rank=4, alpha=8.0, targets=supra.LOLCATS_LORA["targets"])
        assert model.layers[0].attention.wq.base is before[0][0]
        torch.testing.assert_close(model(tokens), plain, atol=0, rtol=0)  # a fresh adapter is the identity
        remove_lora(model, wrappers)
    assert model.layers[0].attention.wq is before[0][0]
    with pytest.raises(ValueError, match="linearised already"):
        linearize(model)


def test_attention_transfer_trains_only_the_feature_map_and_norm_and_lowers_the_mse():
    model = tiny_model(**NINE_HEADS_GQA)
    teachers = linearize(model, chunk=8)
    phase = supra.recipe("supra-transfer", 1000)[0]
    params = supra.phase_parameters(model, phase)
    assert set(params) == {f"layers.{i}.attention.{m}.{w}" for i in range(2) for m in ("phi", "group_norm")
                                 for w in ("weight", "bias")}
    frozen = {n: c for n, c in checksums(model).items() if n not in params}
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    seqs = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(15):
        loss = supra.attention_transfer_loss(model, teachers, seqs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert {n: c for n, c in checksums(model).items() if n not in params} == frozen


def test_learning_rate_warms_up_from_above_zero_then_decays_to_a_tenth():
    lrs = [supra.lr_at(s, 100, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # 10 warm-up steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_saved_linearised_model_reloads_with_the_same_logits_from_safetensors_and_json(ckpt, tmp_path):
    model, _ = supra.build(ckpt, "cpu", torch.float32, 8, supra.LOLCATS_LORA,
                           torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters() if "phi" in n or "lora" in n]  # what a recipe trained
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(0.1 * torch.randn(params[n].shape, generator=torch.Generator().manual_seed(6)))
    optimizer = torch.optim.AdamW([params[n] for n in names])
    for n in names:
        params[n].requires_grad_(True)
    model(torch.randint(0, 512, (1, 9))).sum().backward()
    optimizer.step()
    supra.save_checkpoint(tmp_path, model, {"phase": "lora", "step": 7, "chunk": 8, "lora": supra.LOLCATS_LORA,
                                            "base_model": str(ckpt)}, names, optimizer)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model-lora-000007.safetensors",
                                                          "optimizer-lora-000007.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["trained"] == sorted(names)
    reloaded, _ = supra.load_linearized(tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    fresh = torch.optim.AdamW([dict(reloaded.named_parameters())[n] for n in names])
    supra.load_optimizer_state(fresh, names, tmp_path / config["optimizer"])
    for p, q in zip(optimizer.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        torch.testing.assert_close(fresh.state[q]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])


def test_calibrated_group_norm_takes_the_softmax_heads_output_std_and_mean_and_lowers_the_starting_mse():
    model = tiny_model(**NINE_HEADS_GQA)
    teachers = linearize(model, chunk=8)
    seqs = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = supra.attention_transfer_loss(model, teachers, seqs).item()
        supra.calibrate_group_norm(model, teachers, seqs)
        after = supra.attention_transfer_loss(model, teachers, seqs).item()
        # layer 0 reads the embeddings, so its softmax heads' output is known without the calibration's loop
        x = model.layers[0].attention_norm(model.tok_embeddings(seqs[:, :-1]))
        cos, sin = rope_cos_sin(model.args, 0, 32, "cpu")
        q = teachers[0].wq(x).view(2, 32, 9, 8).transpose(1, 2)
        k = teachers[0].wk(x).view(2, 32, 3, 8).transpose(1, 2).repeat_interleave(3, dim=1)
        v = teachers[0].wv(x).view(2, 32, 3, 8).transpose(1, 2).repeat_interleave(3, dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        heads = torch.softmax((q @ k.transpose(-1, -2)) / 8 ** 0.5 + torch.full((32, 32), -math.inf).triu(1), -1) @ v
        heads = heads.transpose(1, 2).reshape(64, 72)                                   # (tokens, n_heads * d)
    gn = model.layers[0].attention.group_norm
    torch.testing.assert_close(gn.weight, heads.std(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gn.bias, heads.mean(0), atol=1e-5, rtol=1e-4)
    assert after < 0.5 * before


def _pretrained_tiny(seed=0):
    """A tiny model trained for a few seconds on the bytes of data/harvester.txt, so that attention matters;
    the last 4K bytes are held out."""
    ids = torch.tensor(list((Path(__file__).parent.parent / "data" / "harvester.txt").read_bytes()))
    train, held = ids[:-4096], ids[-4096:][: 31 * 129].view(31, 129)
    model = tiny_model(seed, hidden_dim=96, **NINE_HEADS_GQA).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(120):
        starts = torch.randint(0, len(train) - 129, (8,), generator=g)
        supra.next_token_loss(model, torch.stack([train[s:s + 129] for s in starts])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval().requires_grad_(False), train, held


def _train(model, teachers, phase, train, steps, lr, seed):
    params = list(supra.phase_parameters(model, phase).values())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.stack([train[s:s + 129] for s in torch.randint(0, len(train) - 129, (4,), generator=g)])
        loss = (supra.attention_transfer_loss(model, teachers, batch) if phase.loss == "attention_transfer"
                else supra.next_token_loss(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.requires_grad_(False)


@pytest.mark.parametrize("calibrated", [False, True], ids=["official_start", "calibrated"])
def test_attention_transfer_then_uptraining_lower_the_held_out_next_token_loss(calibrated):
    pretrained, train, held = _pretrained_tiny()
    model = copy.deepcopy(pretrained)
    teachers = linearize(model, chunk=16)
    if calibrated:
        supra.calibrate_group_norm(model, teachers, train[:4 * 129].view(4, 129))
    held_loss = lambda: supra.next_token_loss(model, held).item()  # noqa: E731
    losses = [held_loss()]
    _train(model, teachers, supra.recipe("supra-transfer", 2)[0], train, 30, 1e-2, seed=1)  # φ and the norm
    losses.append(held_loss())
    _train(model, teachers, supra.recipe("supra", 2)[0], train, 30, 1e-3, seed=2)           # every weight
    losses.append(held_loss())
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
