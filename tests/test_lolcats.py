"""methods/lolcats.py: Hedgehog's feature map, the linear-window attention's two forms agree on awkward sizes, the
state replaces the KV cache (generation, the protocol), a text within the window is exactly softmax attention,
and the two training steps lower the held-out next-token loss; bench/lolcats.py runs end to end and resumes."""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bench import lolcats as bench_lolcats
from helpers import checksums, tiny_model
from lora import add_lora
from methods import lolcats
from methods.lolcats import HedgehogFeatureMap, LayerState, LoLCATsState, chunked, linearize, parallel
from methods.supra import next_token_loss, save_checkpoint, score_block
from model import generate
from protocol import evaluate_blocks

NINE_HEADS = dict(n_heads=9, n_kv_heads=9, head_dim=8, dim=48)
NINE_HEADS_GQA = dict(n_heads=9, n_kv_heads=3, head_dim=8, dim=48)


def test_hedgehog_feature_map_is_softmax_of_xw_and_of_minus_xw_head_by_head():
    fmap = HedgehogFeatureMap(3, 4, 5, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 7, 4)
    out = fmap(x)
    assert out.shape == (2, 3, 7, 10)
    for h in range(3):
        xw = x[:, h] @ fmap.weight[h]                                        # this head's own W (d x f)
        torch.testing.assert_close(out[:, h], torch.cat((torch.softmax(xw, -1), torch.softmax(-xw, -1)), -1))


def _inputs(H=9, T=37, d=8, F_=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    fq, fk = (torch.rand(2, H, T, F_, generator=g, dtype=torch.float64) for _ in range(2))   # features are > 0
    omega = torch.rand(H, generator=g, dtype=torch.float64)
    return q, k, v, fq, fk, omega


def _empty(H=9, d=8, F_=6):
    return LayerState(*(torch.zeros(s, dtype=torch.float64) for s in
                        ((2, H, F_, d), (2, H, F_), (2, H, 0, d), (2, H, 0, d), (2, H, 0, F_))))


@pytest.mark.parametrize("window", [1, 5, 16, 64])   # 64: longer than the text, no linear part at all
@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])  # 37 tokens: a multiple of no chunk but 1 and 37
def test_parallel_and_chunked_forms_agree_on_nine_heads_and_uneven_lengths(window, chunk):
    q, k, v, fq, fk, omega = _inputs()
    expected = parallel(q, k, v, fq, fk, omega, window)
    got, state = chunked(q, k, v, fq, fk, omega, window, _empty(), chunk)
    torch.testing.assert_close(got, expected)
    kept = min(window - 1, 37)
    assert state.k.shape[-2] == kept   # the state keeps the window of the next token, no more
    torch.testing.assert_close(state.k, k[..., 37 - kept:, :])
    torch.testing.assert_close(state.z, fk[..., :37 - kept, :].sum(-2))  # every key that left the window


@pytest.mark.parametrize("chunk", [1, 4, 256])
def test_the_state_carried_over_uneven_pieces_gives_the_outputs_of_one_pass(chunk):
    q, k, v, fq, fk, omega = _inputs(T=41)
    expected = parallel(q, k, v, fq, fk, omega, 6)
    state, outs, pos = _empty(), [], 0
    for n in (3, 1, 1, 11, 7, 18):
        o, state = chunked(*(t[..., pos:pos + n, :] for t in (q, k, v, fq, fk)), omega, 6, state, chunk)
        outs.append(o)
        pos += n
    torch.testing.assert_close(torch.cat(outs, dim=-2), expected)


def test_the_normaliser_makes_every_output_a_weighted_mean_of_the_values():
    q, k, v, fq, fk, omega = _inputs()
    v = torch.full_like(v, 3.0)             # every value the same: so is every weighted mean
    torch.testing.assert_close(parallel(q, k, v, fq, fk, omega, 5), v)


def _linearised(seed=0, form="chunked", chunk=4, window=6, **config):
    model = tiny_model(seed, **config)
    linearize(model, window=window, feature_dim=5, chunk=chunk, form=form,
              generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # move the window weights away from their equal start, so each head is tested
        for layer in model.layers:
            layer.attention.window_factor.add_(torch.randn(9, generator=torch.Generator().manual_seed(seed)))
    return model


def _set_form(model, form):
    for layer in model.layers:
        layer.attention.form = form


def test_a_text_within_the_window_is_scored_exactly_as_by_softmax_attention():
    base = tiny_model(**NINE_HEADS_GQA)
    model = _linearised(window=64, **NINE_HEADS_GQA)  # the same weights (same seed), linearised
    tokens = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), base(tokens), atol=1e-5, rtol=1e-5)  # ω cancels out


@pytest.mark.parametrize("config", [NINE_HEADS, NINE_HEADS_GQA], ids=["9_heads", "9_heads_gqa_3_kv"])
def test_linearised_model_gives_the_same_logits_in_both_forms(config):
    model = _linearised(**config)
    tokens = torch.randint(0, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(tokens)
        _set_form(model, "parallel")
        torch.testing.assert_close(fast, model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [NINE_HEADS, NINE_HEADS_GQA], ids=["9_heads", "9_heads_gqa_3_kv"])
def test_state_carried_over_uneven_pieces_equals_one_forward_over_the_whole_text(config):
    model = _linearised(**config)
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    state, pieces, pos = LoLCATsState(model), [], 0
    with torch.no_grad():
        whole = model(tokens)
        for n in (13, 1, 9, 17):  # chunk 4, window 6: none of them a multiple
            pieces.append(model(tokens[:, pos:pos + n], pos, state))
            pos += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_the_state_equals_the_parallel_forward():
    model = _linearised(**NINE_HEADS_GQA)
    prompt = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(3)).tolist()[0]
    new = generate(model, LoLCATsState(model), prompt, 0, 12)  # prefill, then one token at a time
    _set_form(model, "parallel")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == new


def test_the_state_does_not_grow_with_the_text():
    model = _linearised(**NINE_HEADS)
    sizes = []
    for n in (20, 200):
        state = LoLCATsState(model)
        with torch.no_grad():
            model(torch.randint(0, 300, (1, n)), 0, state)
        sizes.append(state.nbytes())
    assert sizes[0] == sizes[1]


def test_scoring_block_by_block_with_the_state_equals_one_forward_with_no_window():
    model = _linearised(**NINE_HEADS)
    ids = torch.randint(0, 300, (70,), generator=torch.Generator().manual_seed(4)).tolist()
    state = LoLCATsState(model)
    r = evaluate_blocks(ids, 16, lambda i, s, e: {"nll_lolcats": score_block(model, state, ids, s, e)})
    with torch.no_grad():
        nll = F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="sum").item()
    assert r["scored_tokens"] == 69 and state.length == 69
    assert r["ppl_lolcats"] == pytest.approx(math.exp(nll / 69), rel=1e-5)


def test_linearize_reuses_the_pretrained_linears_and_refuses_a_second_time():
    model = tiny_model(**NINE_HEADS_GQA)
    before = [(l.attention.wq, l.attention.wk, l.attention.wv, l.attention.wo) for l in model.layers]
    linearize(model)
    for layer, linears in zip(model.layers, before):
        a = layer.attention
        assert (a.wq, a.wk, a.wv, a.wo) == linears
        assert a.feature_map_q.weight is not a.feature_map_k.weight  # keys have a map of their own
    with pytest.raises(ValueError, match="linearised already"):
        linearize(model)


# ----------------------------------------------------------------------------- training

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
        next_token_loss(model, torch.stack([train[s:s + 129] for s in starts])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval().requires_grad_(False), train, held


def _train(model, phase, params, train, steps, lr, seed):
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.stack([train[s:s + 129] for s in torch.randint(0, len(train) - 129, (4,), generator=g)])
        loss = (lolcats.attention_transfer_loss(model, batch) if phase == "transfer" else next_token_loss(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().requires_grad_(False)


def test_attention_transfer_then_lora_lower_the_held_out_next_token_loss_and_train_only_their_parameters():
    model, train, held = _pretrained_tiny()
    linearize(model, window=8, feature_dim=8, chunk=16, generator=torch.Generator().manual_seed(0))
    add_lora(model, **lolcats.LORA, generator=torch.Generator().manual_seed(0))
    held_loss = lambda: next_token_loss(model, held).item()  # noqa: E731
    losses = [held_loss()]
    for phase, lr in zip(lolcats.recipe(1, 1), (1e-2, 1e-3)):
        params = lolcats.phase_parameters(model, phase)
        before = {n: c for n, c in checksums(model).items() if n not in params}
        _train(model, phase.name, list(params.values()), train, 30, lr, seed=len(losses))
        assert {n: c for n, c in checksums(model).items() if n not in params} == before  # nothing else moved
        losses.append(held_loss())
    assert losses[1] < losses[0] and losses[2] < losses[1], losses
    names = set(lolcats.phase_parameters(model, lolcats.recipe(1, 1)[0]))
    assert names == {f"layers.{i}.attention.{m}" for i in range(2)
                     for m in ("feature_map_q.weight", "feature_map_k.weight", "window_factor")}


def test_the_transfer_back_propagated_layer_by_layer_gives_the_loss_and_gradients_of_one_backward():
    model = _linearised(seed=3, chunk=5, window=4, **NINE_HEADS_GQA)
    params = [p for n, p in model.named_parameters() if "feature_map" in n or "window_factor" in n]
    for p in params:
        p.requires_grad_(True)
    seqs = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    whole = lolcats.attention_transfer_loss(model, seqs)
    whole.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    layered = lolcats.attention_transfer_loss(model, seqs, backward=True)
    assert not layered.requires_grad and whole.item() > 0
    torch.testing.assert_close(layered, whole.detach(), rtol=1e-6, atol=0)
    for p, g in zip(params, grads):
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-9)


def test_a_saved_lolcats_model_reloads_with_the_same_logits(ckpt, tmp_path):
    model = lolcats.build(ckpt, "cpu", torch.float32, window=8, feature_dim=4, chunk=8, seed=3)
    names = [n for n, _ in model.named_parameters() if "feature_map" in n or "lora" in n or "window_factor" in n]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].add_(0.1 * torch.randn(params[n].shape, generator=torch.Generator().manual_seed(6)))
    save_checkpoint(tmp_path, model, {"phase": "lora", "step": 2, "base_model": str(ckpt), "window": 8,
                                      "feature_dim": 4, "chunk": 8, "seed": 3}, names)
    reloaded, _ = lolcats.load_lolcats(tmp_path)
    tokens = torch.randint(0, 512, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), model(tokens), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bench/lolcats.py

@pytest.fixture
def dirs(tmp_path, book):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "1.txt").write_text(book.read_text())
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("The harvester walked the long road to the marsh at dawn. " * 60)
    return tmp_path


def _args(ckpt, dirs, out, *more):
    return ["--quick", "--model", str(ckpt), "--books-dir", str(dirs / "books"), "--book-ids", "1",
            "--train-books-dir", str(dirs / "train"), "--out", str(out), "--threads", "1", *more]


def _file_hashes(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def test_quick_bench_writes_protocol_results_after_each_step_beside_the_base_model(ckpt, dirs):
    base_files = _file_hashes(ckpt)
    out = dirs / "out"
    assert bench_lolcats.main(_args(ckpt, dirs, out)) == 0
    for run, scorer in [("base-w128", "base"), ("transfer", "transfer"), ("lolcats", "lolcats")]:
        r = json.loads((out / f"lolcats-{run}-1.json").read_text())
        assert r["scored_tokens"] == 192 and math.isfinite(r[f"ppl_{scorer}"])
        assert r["chunks"][0]["start"] == 1 and all(f"nll_{scorer}" in c for c in r["chunks"])
    train = json.loads((out / "lolcats-train.json").read_text())
    assert train["tokens_seen"] == {"transfer": 4 * 2 * 96, "lora": 3 * 2 * 96}
    assert [h["phase"] for h in train["history"]] == ["transfer"] * 4 + ["lora"] * 3
    assert all(math.isfinite(h["loss"]) and h["lr"] == h0["lr"] for h in train["history"]
               for h0 in train["history"] if h0["phase"] == h["phase"])  # a constant lr in each phase
    assert "| LoLCATs (transfer, then LoRA)" in (out / "lolcats-summary.md").read_text()
    assert _file_hashes(ckpt) == base_files  # the base checkpoint is never written
    results = {n: h for n, h in _file_hashes(out).items() if n.endswith("-1.json")}
    assert bench_lolcats.main(_args(ckpt, dirs, out)) == 0  # a rerun of a finished run: nothing to redo
    assert {n: h for n, h in _file_hashes(out).items() if n.endswith("-1.json")} == results


def test_an_interrupted_bench_resumes_to_the_weights_of_an_uninterrupted_one(ckpt, dirs, monkeypatch):
    only_train = ["--skip", "reference,eval"]
    assert bench_lolcats.main(_args(ckpt, dirs, dirs / "whole", *only_train)) == 0
    real, calls = bench_lolcats.next_token_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # during LoRA step 3 of 3: the last checkpoint is step 2's
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(bench_lolcats, "next_token_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_lolcats.main(_args(ckpt, dirs, dirs / "resumed", *only_train))
    config = json.loads((dirs / "resumed" / "checkpoints" / "config.json").read_text())
    assert (config["phase"], config["step"]) == ("lora", 2)
    monkeypatch.setattr(bench_lolcats, "next_token_loss", real)
    assert bench_lolcats.main(_args(ckpt, dirs, dirs / "resumed", *only_train)) == 0

    def final(out):
        folder = out / "checkpoints"
        return load_file(folder / json.loads((folder / "config.json").read_text())["weights"])
    whole, resumed = final(dirs / "whole"), final(dirs / "resumed")
    assert whole.keys() == resumed.keys() and all((whole[k] == resumed[k]).all() for k in whole)
    # other settings on the same checkpoint: refused, not mixed in
    assert bench_lolcats.main(_args(ckpt, dirs, dirs / "resumed", *only_train, "--window", "8")) == 2


@pytest.mark.parametrize("flag", [["--lora-steps", "-1"], ["--window", "0"], ["--skip", "decode"]])
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(ckpt, dirs, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench_lolcats.main(_args(ckpt, dirs, dirs / "out", *flag))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag[0] in err and "Traceback" not in err
