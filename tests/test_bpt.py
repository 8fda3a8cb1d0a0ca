"""methods/bpt.py: the blockwise adapter step computes the standard one's loss and gradients, both attention
forms equal the model's own attention, recomputation replays the dropout masks, and Temp-LoRA with
--blockwise scores a text as without it. Oracles: the model's own layer (SDPA) and train_block.block_loss."""
import json
from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from cli import main
from helpers import checksums, tiny_model
from lora import LoRALinear, add_lora, lora_parameters
from methods import bpt
from model import rope_cos_sin
from templora import TempLoRAConfig, evaluate
from train_block import block_loss

AWKWARD = dict(dim=72, n_heads=9, n_kv_heads=3, head_dim=8)  # 9 heads, GQA 3:1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Blocks of a tiny model are many small ops: on a shared 2-core machine a second thread only adds
    contention (measured: evaluate below took 10x longer with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_with_random_b(model, dropout=0.0, generator=None):
    """A LoRA whose B is not zero, so every adapter tensor gets a non-zero gradient."""
    add_lora(model.requires_grad_(False), rank=4, alpha=8, dropout=dropout, generator=generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0.0, 0.1)


def loss_and_grads(model, loss_fn, context, block):
    for p in lora_parameters(model):
        p.grad = None
    loss = loss_fn(model, context, block)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "online-softmax"])
def test_blockwise_layer_equals_the_models_layer_on_awkward_sizes(fused):
    model = tiny_model(**AWKWARD)
    x = torch.randn(1, 23, 72)  # 23 rows: blocks of 5 (the last has 3), key blocks of 7 (the last has 2)
    cos, sin = rope_cos_sin(model.args, 0, 23, x.device)
    for layer in model.layers:
        expected = layer(x, cos, sin, 0)
        torch.testing.assert_close(bpt.blockwise_layer(layer, x, cos, sin, 5, 7, fused), expected, atol=2e-5, rtol=1e-5)


def test_online_softmax_equals_the_fused_kernel_for_queries_after_cached_keys():
    q, k, v = torch.randn(2, 9, 6, 8), torch.randn(2, 9, 17, 8), torch.randn(2, 9, 17, 8)
    # the oracle: softmax over the keys each query may see, query r at position 17 - 6 + r
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    visible = torch.arange(17)[None, :] <= torch.arange(11, 17)[:, None]
    expected = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    for kv_block in (1, 4, 17, 64):
        torch.testing.assert_close(bpt.online_softmax_attention(q, k, v, kv_block), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bpt.fused_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config, n_context, n_block", [
    (AWKWARD, 17, 13),                                             # GQA, untied head, context + block
    (dict(n_kv_heads=4, tie_embeddings=True), 11, 9),              # MHA, tied head
    (dict(tie_embeddings=True), 0, 13),                            # the text's first block: no context
], ids=["gqa-untied", "mha-tied", "no-context"])
@pytest.mark.parametrize("form", [
    dict(),                                                        # BPT, fused attention (the default)
    dict(fused=False),                                             # BPT, the online-softmax loop
    dict(layers="checkpointed", loss="full"),                      # the benchmark's baselines
    dict(layers="plain", loss="blockwise"),
], ids=["bpt", "bpt-online-softmax", "checkpointed-layers", "blockwise-loss"])
def test_blockwise_step_has_the_standard_loss_and_adapter_gradients(config, n_context, n_block, form):
    model = tiny_model(**config)
    adapter_with_random_b(model)
    ids = torch.randint(0, 300, (n_context + n_block,), generator=torch.Generator().manual_seed(1)).tolist()
    context, block = ids[:n_context], ids[n_context:]
    loss, grads = loss_and_grads(model, block_loss, context, block)
    got_loss, got_grads = loss_and_grads(
        model, lambda m, c, b: bpt.block_loss(m, c, b, q_block=5, kv_block=3, loss_block=4, **form), context, block)
    torch.testing.assert_close(got_loss, loss, atol=1e-6, rtol=1e-6)
    assert len(got_grads) == 2 * 7 * model.args.n_layers and all(g.abs().max() > 0 for g in grads)
    for got, expected in zip(got_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_between_forward_and_backward_bpt_keeps_only_each_layers_input():
    """What autograd holds after the forward (every saved tensor's storage, counted once): for BPT the input
    of each layer, cos and sin, the token ids and the loss rows; for today's step, every activation."""
    model = tiny_model(dim=64, n_layers=4, max_seq_len=1024)
    add_lora(model.requires_grad_(False), rank=4, alpha=8, dropout=0.05, generator=torch.Generator().manual_seed(0))
    model.train()
    ids = torch.randint(0, 300, (640,), generator=torch.Generator().manual_seed(3)).tolist()
    context, block = ids[:512], ids[512:]  # T = 639 positions, 128 of them with a loss

    def kept_bytes(loss_fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model, context, block)
        return sum(storages.values())
    T, args = 639, model.args
    kept = kept_bytes(lambda m, c, b: bpt.block_loss(m, c, b, q_block=128, loss_block=64))
    layer_inputs = args.n_layers * T * args.dim * 4                       # fp32
    assert kept == layer_inputs + 2 * T * args.head_dim * 4 + 640 * 8 + 128 * args.dim * 4  # + cos, sin; ids; loss rows
    plain = kept_bytes(lambda m, c, b: block_loss(m, c, b, lean=False))
    assert plain > 15 * kept
    assert kept < kept_bytes(block_loss) < 0.5 * plain


def test_recomputation_replays_the_adapters_dropout_masks(monkeypatch):
    """Oracle: the same blockwise step with nothing recomputed (every block's activations kept), which draws
    the same masks in the same order; with dropout, a recomputation that drew new masks would differ."""
    model = tiny_model(**AWKWARD)
    generator = torch.Generator().manual_seed(0)
    adapter_with_random_b(model, dropout=0.3, generator=generator)
    model.train()
    context, block = list(range(17)), list(range(40, 53))

    def step():
        generator.manual_seed(1)
        loss, grads = loss_and_grads(model, lambda m, c, b: bpt.block_loss(m, c, b, q_block=5, kv_block=3), context, block)
        return loss, grads, generator.get_state()
    loss, grads, state = step()
    monkeypatch.setattr(bpt, "recomputed", lambda module, fn, *args: fn(*args))
    kept_loss, kept_grads, kept_state = step()
    assert torch.equal(loss, kept_loss) and torch.equal(state, kept_state)  # later draws continue the same stream
    for got, expected in zip(grads, kept_grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # and the property is real: plain checkpointing (global RNG only) recomputes with other masks
    monkeypatch.setattr(bpt, "recomputed", lambda module, fn, *args: checkpoint(fn, *args, use_reentrant=False))
    _, plain_grads, _ = step()
    assert max((a - b).abs().max() for a, b in zip(plain_grads, kept_grads)) > 1e-3


def test_evaluate_with_blockwise_scores_as_without_and_leaves_the_base_bit_identical():
    model = tiny_model(**AWKWARD)
    before = checksums(model)
    ids = torch.randint(0, 300, (90,), generator=torch.Generator().manual_seed(2)).tolist()
    # dropout 0: the blockwise step draws its masks per block, so with dropout the two runs would differ by design
    knobs = dict(delta=16, context=21, window=48, keep=24, rank=8, alpha=16, dropout=0.0, lr=1e-2, epochs=2)
    plain = evaluate(model, ids, TempLoRAConfig(**knobs))
    blockwise = evaluate(model, ids, TempLoRAConfig(**knobs), loss_fn=partial(bpt.block_loss, q_block=7))
    assert checksums(model) == before
    for a, b in zip(plain["chunks"], blockwise["chunks"]):
        assert b["nll_base"] == a["nll_base"]
        assert b["nll_templora"] == pytest.approx(a["nll_templora"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert plain["chunks"][-1]["nll_templora"] != pytest.approx(plain["chunks"][-1]["nll_base"], rel=1e-3)  # it trained
    assert blockwise["ppl_templora"] == pytest.approx(plain["ppl_templora"], rel=1e-5)


def test_block_sizes_and_forms_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="block sizes must be positive"):
        bpt.block_loss(model, [1, 2], [3, 4], q_block=0)
    with pytest.raises(ValueError, match="layers must be one of"):
        bpt.block_loss(model, [1, 2], [3, 4], layers="fast")


def test_cli_blockwise_flag_runs_and_a_negative_value_exits_2(ckpt, book, tmp_path, capsys):
    knobs = ["--delta", "32", "--context", "48", "--window", "96", "--keep", "32", "--rank", "4", "--quiet",
             "--max-tokens", "100", "--model", str(ckpt), "--text", str(book)]
    out = tmp_path / "r.json"
    assert main(["eval", *knobs, "--blockwise", "16", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["blockwise"] == 16
    assert main(["eval", *knobs, "--blockwise", "-1", "--out", str(out)]) == 2
    assert "--blockwise must be >= 0" in capsys.readouterr().err



# ----------------------------------------------------------------------------- bench/bpt.py, end to end on tiny sizes

def test_bench_table_measures_a_point_in_a_child_and_resumes(ckpt, tmp_path, capsys):
    from bench import bpt as bench
    argv = ["table", "--quick", "--model", str(ckpt), "--out", str(tmp_path), "--models", "smollm2",
            "--variants", "bpt", "--lengths", "64"]
    assert bench.main(argv) == 0
    r = json.loads((tmp_path / "bpt-table.json").read_text())
    point = r["points"]["smollm2|bpt|64"]
    assert point["status"] == "ok" and point["peak_gib"] > 0 and point["step_s"] > 0
    assert all(x == x for x in point["losses"])  # two finite losses: no step was skipped
    assert r["summary"]["smollm2"]["longest_in_budget"] == {"bpt": 64}
    assert (tmp_path / "bpt-memory.png").stat().st_size > 0 and "| bpt |" in (tmp_path / "bpt-table.md").read_text()
    assert bench.main(argv) == 0  # resumed: nothing left to run
    assert json.loads((tmp_path / "bpt-table.json").read_text())["points"] == r["points"]
    assert bench.main(argv + ["--budget-gib", "4"]) == 2  # other settings: refused, not mixed in
    assert "other settings (budget_gib)" in capsys.readouterr().err


def test_bench_table_prunes_after_oom_and_extrapolates_layers(tmp_path, monkeypatch):
    """The children replaced by a memory model: peak = 1 + layers * T / 64 GiB, OOM above the budget."""
    from bench import bpt as bench
    ran = []

    def child(spec, timeout_s):
        ran.append(spec)
        layers = spec["config"]["num_hidden_layers"]
        shrink = 4 if spec["variant"] == "bpt" else 1
        peak = 1 + layers * spec["length"] / 64 / shrink
        if peak > spec["budget_gib"]:
            return {"status": "OOM"}
        return {"status": "ok", "peak_gib": peak, "setup_gib": 1.0, "step_s": layers * shrink * 0.1}
    monkeypatch.setattr(bench, "child", child)
    assert bench.main(["table", "--quick", "--model", "unused", "--out", str(tmp_path), "--models", "llama1b",
                       "--llama1b-layers", "4", "--variants", "today,bpt", "--lengths", "32,64,128,256",
                       "--budget-gib", "20"]) == 0
    r = json.loads((tmp_path / "bpt-table.json").read_text())
    # today at 4 layers: 3, 5, 9, 17 GiB fit; bpt fits all. At 2 layers everything fits. Nothing was pruned...
    assert len(ran) == 16
    full = r["summary"]["llama-3.2-1b-16L"]
    # ...but at 16 layers (extrapolated: 1 + 16 T / 64) today fits up to T=64 (17 GiB), bpt up to T=256 (17 GiB)
    assert full["points"]["today"]["64"]["peak_gib"] == pytest.approx(17.0)
    assert full["longest_in_budget"] == {"today": 64, "bpt": 256}
    assert full["bpt_ratios"]["bpt/today"] == {"ratio": 4.0, "at_least": True}
    assert full["recompute_time_cost"]["bpt"]["step_s_ratio_to_today"] == pytest.approx(4.0)
    ran.clear()
    assert bench.main(["table", "--quick", "--model", "unused", "--out", str(tmp_path / "b"), "--models", "llama1b",
                       "--llama1b-layers", "4", "--variants", "today", "--lengths", "32,64,128,256",
                       "--budget-gib", "6"]) == 0
    points = json.loads((tmp_path / "b" / "bpt-table.json").read_text())["points"]
    assert [s["length"] for s in ran if s["config"]["num_hidden_layers"] == 4] == [32, 64, 128]  # 9 GiB: OOM
    assert points["llama-3.2-1b-4L|today|256"] == {"status": "OOM", "skipped": "OOM at T=128"}  # not run


def test_bench_table_tells_a_limit_found_from_one_not_reached(tmp_path, monkeypatch):
    """A variant stopped by the time budget is a lower bound, one never run is "not run": neither "fits none"."""
    from bench import bpt as bench

    def child(spec, timeout_s):
        if spec["variant"] == "today" and spec["length"] > 32:
            return {"status": "timeout"}
        return {"status": "ok", "peak_gib": 1.0 + spec["length"] / 64, "setup_gib": 1.0, "step_s": 1.0}
    monkeypatch.setattr(bench, "child", child)
    assert bench.main(["table", "--quick", "--model", "unused", "--out", str(tmp_path), "--models", "llama1b",
                       "--llama1b-layers", "16", "--variants", "today,checkpoint,bpt", "--lengths", "32,64,128",
                       "--budget-gib", "2.5"]) == 0
    r = json.loads((tmp_path / "bpt-table.json").read_text())["summary"]["llama-3.2-1b-16L"]
    assert r["longest_in_budget"] == {"today": 32, "checkpoint": 64, "bpt": 64}
    assert r["limit_found"] == {"today": False, "checkpoint": True, "bpt": True}  # 128: 3 GiB > 2.5
    assert r["bpt_ratios"] == {"bpt/today": {"ratio": None, "why": "today not measured up to its limit"},
                               "bpt/checkpoint": {"ratio": 1.0, "at_least": False}}
    table = (tmp_path / "bpt-table.md").read_text()
    assert "| today | 1.50 GiB, 1.00 s | timeout | timeout (not run) | ≥ 32 |" in table
    assert "| checkpoint |" in table and "| 64 |" in table


def test_bench_table_on_a_cpu_kills_a_point_past_the_budget(ckpt):
    """The CPU has no allocator limit: the parent watches the child's resident memory and stops it."""
    from bench import bpt as bench
    spec = {"variant": "today", "length": 64, "path": str(ckpt), "config": None, "delta": 32, "device": "cpu",
            "dtype": "float32", "budget_gib": 0.05, "q_block": 32, "kv_block": 32, "loss_block": 16, "rank": 4,
            "warmup": False}
    r = bench.child(spec, timeout_s=120)
    assert r["status"] == "OOM" and r["killed_at_rss_gib"] > 0.05
    r = bench.child(spec | {"budget_gib": 64.0}, timeout_s=120)
    assert r["status"] == "ok" and 0.05 < r["peak_gib"] < 64 and "first_step_s" in r and r["step_s"] > 0


def test_bench_books_writes_a_protocol_json_per_variant_and_book(ckpt, book, tmp_path):
    from bench import bpt as bench
    from bench.compare import book_of
    assert bench.main(["books", "--quick", "--model", str(ckpt), "--books-dir", str(book.parent),
                       "--book-ids", book.stem, "--out", str(tmp_path)]) == 0
    short, long = (json.loads((tmp_path / f"bpt-LT{n}-{book.stem}.json").read_text()) for n in (16, 64))
    for r in (short, long):
        assert r["scored_tokens"] == 128 and sum(c["tokens"] for c in r["chunks"]) == 128
        assert {"nll_base", "nll_templora", "start", "tokens"} <= set(r["chunks"][0])
        assert r["ppl_templora"] > 0 and r["timings"]["train_s"] > 0 and r["peak_memory_mib"] > 0
        assert book_of(r) == book.stem and r["dtype"] == "float32" and r["device"] == "cpu" and "command" in r
    assert (short["config"]["context"], short["config"]["blockwise"]) == (16, 0)
    assert (long["config"]["context"], long["config"]["blockwise"]) == (64, 16)
    assert short["ppl_base"] == long["ppl_base"]  # the same text, the same base model
    assert "| LT64 |" in (tmp_path / "bpt-books.md").read_text()
