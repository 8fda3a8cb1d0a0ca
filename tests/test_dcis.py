"""methods/dcis.py: the search's schedule and guarantees on objectives whose answer is known, its log and
resume, the chunked-head objective, and the searched checkpoint in transformers; bench/dcis.py end to end."""
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from helpers import checksums, tiny_model, write_hf_checkpoint
from load_llama import load_model
from methods import dcis


def bowl(target: list[float], floor: float = 0.0):
    """A separable objective with its minimum at `target`, plus a constant floor."""
    return lambda factors: floor + sum((x - t) ** 2 for x, t in zip(factors, target))


def test_the_papers_schedule_is_620_evaluations_at_head_dim_64_coarse_to_fine_low_frequencies_first():
    result = dcis.dcis(bowl([3.0] * 32), [1.0] * 32, offsets=10)
    assert result["evaluations"] == dcis.schedule_size(32, 10) == 1 + 620  # the start, then 10 x 62 groups
    sizes = [g["size"] for g in result["groups"]]
    assert sizes == [16] * 2 + [8] * 4 + [4] * 8 + [2] * 16 + [1] * 32
    assert [g["pairs"] for g in result["groups"][:3]] == [[16, 32], [0, 16], [24, 32]]
    assert result["groups"][0]["offsets"] == pytest.approx([-5 + 10 * c / 9 for c in range(10)])


def test_search_finds_a_separable_optimum_and_never_ends_worse_than_its_start():
    target = [1.0, 1.2, 1.5, 2.0, 2.6, 3.3, 3.9, 4.0]
    result = dcis.dcis(bowl(target), [4.0] * 8, offsets=10)
    assert result["value"] < 1e-2 * result["start_value"]
    assert max(abs(x - t) for x, t in zip(result["factors"], target)) < 0.1
    # an objective with nothing to gain: every offset is worse, so the start is kept (the official code
    # would move every group to its least bad offset)
    kept = dcis.dcis(bowl(target), target, offsets=10)
    assert kept["factors"] == target and kept["value"] == kept["start_value"] == 0.0


def test_a_weak_model_above_perplexity_100_is_still_searched():
    # the official code drops every offset with perplexity >= 100: here it would change nothing at all
    target = [1.0, 2.0, 3.0, 4.0]
    result = dcis.dcis(bowl(target, floor=500.0), [2.5] * 4, offsets=6)
    assert result["value"] < result["start_value"] - 1.0


def test_the_budget_stops_the_search_and_a_resumed_run_redoes_nothing_and_ends_the_same():
    target = [1.0, 1.7, 2.2, 3.0, 3.1, 3.8, 4.2, 4.4]
    calls = []

    def score(factors):
        calls.append(json.dumps(factors))
        return bowl(target)(factors)

    whole = dcis.dcis(score, [2.0] * 8, offsets=5)
    n_whole = len(calls)
    calls.clear()
    known = {}  # what a log holds
    first = dcis.dcis(score, [2.0] * 8, offsets=5, max_evals=23, known=known)
    assert first["evaluations"] == 23 and not first["complete"] and first["value"] <= first["start_value"]
    before, calls_first = set(known), list(calls)
    calls.clear()
    resumed = dcis.dcis(score, [2.0] * 8, offsets=5, known=known)
    assert not before & set(calls) and len(calls_first) + len(calls) == n_whole  # each candidate scored once
    assert resumed["factors"] == whole["factors"] and resumed["value"] == whole["value"] and resumed["complete"]


def test_document_nll_with_the_head_in_slices_equals_the_full_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]                                 # (36, vocab)
        expected = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    for rows in (7, 36, 100):  # slices that do not divide the length, exactly it, and more than it
        assert dcis.document_nll(model, ids, rows=rows) == pytest.approx(expected, rel=1e-5)


def test_search_on_a_model_logs_every_evaluation_resumes_and_refuses_other_settings(tmp_path):
    model = tiny_model(rope_theta=100.0)
    before = checksums(model)
    ids = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    log, lines = tmp_path / "log.json", []
    run = lambda **kw: dcis.search(model, ids, 2.0, 32, offsets=3, log_path=log, settings={"book": "a"},  # noqa: E731
                                   progress=lines.append, **kw)
    result = run()
    assert result["complete"] and result["value"] <= result["start_value"] and model.args.rope_scaling is None
    assert len(json.loads(log.read_text())["evaluations"]) == len(lines) > 20
    # the log's perplexities are those of the stretched model
    factors = result["factors"]
    assert dcis.stretched_perplexity(model, ids, factors, 2.0, 32, result["attention_factor"]) == \
        pytest.approx(result["value"], rel=1e-6)
    model.args = replace(model.args, rope_scaling=None)
    lines.clear()
    again = run()
    assert lines == [] and again["factors"] == factors  # replayed from the log: no forward at all
    with pytest.raises(ValueError, match="other settings"):
        dcis.search(model, ids, 2.0, 32, offsets=4, log_path=log, settings={"book": "a"}, progress=None)
    assert checksums(model) == before


def test_searched_checkpoint_loads_in_ours_and_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "source"
    write_hf_checkpoint(source, shard=False, vocab_size=320, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                        max_position_embeddings=64, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    files_before = {f.name: f.read_bytes() for f in source.iterdir()}
    factors = [0.9, 1.0, 1.4, 1.3, 2.2, 3.5, 3.0, 4.1]  # not monotone, one below 1: what a search may give
    out = dcis.write_checkpoint(source, tmp_path / "stretched", factors, 4.0, 64, dcis.yarn_mscale(4.0))
    assert (out / "model.safetensors").is_symlink()
    assert {f.name: f.read_bytes() for f in source.iterdir()} == files_before  # the source is untouched
    ours = load_model(out, dtype=torch.float32)
    assert ours.args.max_seq_len == 256 and ours.args.rope_scaling["long_factor"] == factors
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    for n in (200, 40):  # past the original 64 and within it: short_factor = long_factor, so no switch
        tokens = torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    plain = load_model(source, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ours.parameters()))


def test_bench_runs_end_to_end_and_resumes(tmp_path, ckpt):
    from bench import dcis as bench
    for folder, names in (("books", ["1", "2"]), ("train", ["9"])):
        (tmp_path / folder).mkdir()
        for n in names:
            (tmp_path / folder / f"{n}.txt").write_text(f"Book {n}: it was the best of times, the worst of times. " * 6)
    argv = ["--quick", "--model", str(ckpt), "--books-dir", str(tmp_path / "books"), "--train-books-dir",
            str(tmp_path / "train"), "--search-book", "9", "--eval-books", "1,2", "--templora-books", "1",
            "--out", str(tmp_path / "out")]
    assert bench.main(argv) == 0
    out = tmp_path / "out"
    r = json.loads((out / "dcis.json").read_text())
    assert list(r["pooled"]) == ["none", "PI", "NTK", "YaRN", "Llama 3", "DCIS"]
    assert all(set(p) >= {"32", "64", "128"} for p in r["pooled"].values())  # every method up to L·s = 128
    assert sum("256" in p for p in r["pooled"].values()) == 3                 # the 3 best past it
    assert r["search"]["value"] <= r["search"]["start_value"] and len(r["search"]["factors"]) == 8
    assert all(math.isfinite(v) for p in r["pooled"].values() for v in p.values())
    assert (out / "dcis.png").stat().st_size > 0
    assert json.loads((out / "dcis-checkpoint" / "config.json").read_text())["max_position_embeddings"] == 128
    for name in ("dcis-stretched-w128-1.json", "dcis-plain-w64-1.json"):
        t = json.loads((out / name).read_text())
        assert t["scored_tokens"] == 128 and t["book"] == "1" and t["ppl_templora"] > 0 and t["ppl_base"] > 0
        assert t["config"]["window"] == int(name.split("-w")[1].split("-")[0]) and "nll_templora" in t["chunks"][0]
    stamp = {f.name: f.stat().st_mtime_ns for f in out.glob("*.json")}
    assert bench.main(argv) == 0   # everything is there: nothing is recomputed or rewritten but dcis.json
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.json") if f.name != "dcis.json"} == \
        {k: v for k, v in stamp.items() if k != "dcis.json"}
    with pytest.raises(SystemExit) as e:  # other settings: refused, exit 2
        bench.main(argv + ["--stretch", "3"])
    assert e.value.code == 2
