"""protocol.py: the block protocol every method is scored by, its arithmetic, and the cache window."""
import math

import pytest

import protocol
from helpers import full_disk_after, tiny_model
from protocol import Window, evaluate_blocks, perplexity, position_table


def test_every_token_after_the_first_is_scored_once_in_blocks_of_delta():
    seen = []

    def step(i, start, end):
        seen.append((i, start, end))
        return {"nll_a": 2.0 * (end - start), "nll_b": 1.0 * (end - start), "note": i}
    r = evaluate_blocks(list(range(100)), 30, step)
    assert seen == [(0, 1, 31), (1, 31, 61), (2, 61, 91), (3, 91, 100)]
    assert r["scored_tokens"] == 99 == sum(c["tokens"] for c in r["chunks"])
    assert r["ppl_a"] == pytest.approx(math.exp(2.0)) and r["ppl_b"] == pytest.approx(math.e)
    assert [c["note"] for c in r["chunks"]] == [0, 1, 2, 3]  # extras are kept per block
    assert all(c["wall_s"] >= 0 for c in r["chunks"]) and r["timings"]["total_s"] > 0


def test_perplexity_weights_blocks_by_their_tokens():
    chunks = [{"tokens": 10, "nll_x": 10 * 1.0}, {"tokens": 30, "nll_x": 30 * 3.0}]
    assert perplexity(chunks, "x") == pytest.approx(math.exp((10 + 90) / 40))  # not the mean of per-block ppl


def test_a_non_finite_score_stops_the_run_instead_of_becoming_a_result():
    with pytest.raises(ValueError, match=r"block 1 \(tokens 11..21\): nll_x is not finite"):
        evaluate_blocks(list(range(40)), 10, lambda i, s, e: {"nll_x": math.nan if i == 1 else 1.0})


def test_a_text_shorter_than_one_block_is_rejected():
    with pytest.raises(ValueError, match="fewer than one block"):
        evaluate_blocks(list(range(10)), 10, lambda i, s, e: {"nll_x": 0.0})


def test_position_table_buckets_by_the_first_token_of_each_block():
    chunks = [{"start": s, "tokens": 2048, "nll_a": 2048 * 3.0, "nll_b": 2048 * 2.0} for s in (1, 2049, 4097, 6145)]
    table = position_table(chunks)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["position", "tokens", "ppl_a", "ppl_b"]
    assert lines[1].startswith("0-4K") and lines[2].startswith("4-8K") and len(lines) == 3
    assert f"{math.exp(3.0):.3f}" in lines[1] and f"{100 * (math.exp(-1.0) - 1):+.1f}%" in lines[1]


def test_a_window_cannot_be_advanced_past_its_size():
    window = Window(tiny_model(), size=16, keep=8)
    window.advance(10)
    assert window.end == 10
    with pytest.raises(ValueError, match="cannot hold 10 \\+ 7"):
        window.advance(7)
    with pytest.raises(ValueError, match="0 < L_x < W"):
        Window(tiny_model(), size=16, keep=16)


def test_a_write_that_fails_midway_leaves_the_old_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    protocol.write_json(path, {"old": [1, 2, 3]})
    old = path.read_bytes()
    monkeypatch.setattr(protocol, "open", full_disk_after(5), raising=False)
    with pytest.raises(OSError, match="No space left"):
        protocol.write_json(path, {"new": list(range(100))})
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_results_are_strict_json_or_not_written(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError, match=r"r.json: not written: the result holds a non-finite number"):
        protocol.write_json(path, {"ppl": math.nan})
    assert not path.exists()
