"""bench/uio.py end to end on a tiny checkpoint (--quick): it trains, scores in the protocol's shape, measures,
resumes, refuses to train on the evaluation books or to score past the training length, and passes the two
memory-form flags to the scorer. (The figures come from the real runs; only the plumbing is checked here.)"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bench import uio as bench_uio
from protocol import perplexity

VARIANTS = ("base-w64", "nomemory", "untrained", "recent", "reservoir", "full")


@pytest.fixture
def dirs(book, tmp_path):
    books, train = tmp_path / "books", tmp_path / "train"
    books.mkdir()
    train.mkdir()
    (books / "349.txt").write_text(book.read_text())
    for name in ("t1", "t2"):  # 213 byte tokens each: one training text of 4 x 32 + 1 tokens per book
        (train / f"{name}.txt").write_text(book.read_text())
    return books, train


def args(ckpt, books, train, out, *more):
    return ["--quick", "--model", str(ckpt), "--books-dir", str(books), "--train-books-dir", str(train),
            "--book-ids", "349", "--out", str(out), "--threads", "1", *more]


def test_uio_bench_trains_scores_by_the_protocol_and_measures(ckpt, dirs, tmp_path):
    books, train = dirs
    out = tmp_path / "out"
    assert bench_uio.main(args(ckpt, books, train, out)) == 0
    ppl = {}
    for variant in VARIANTS:
        r = json.loads((out / f"uio-{variant}-349.json").read_text())
        scorer = "base" if variant.startswith("base-w") else "uio"
        assert r["book"] == "349" and r["scored_tokens"] == 128 and r["text_tokens"] == 129
        assert [c["start"] for c in r["chunks"]] == [1, 33, 65, 97] and all(c["tokens"] == 32 for c in r["chunks"])
        assert r[f"ppl_{scorer}"] == pytest.approx(perplexity(r["chunks"], scorer)) and math.isfinite(r[f"ppl_{scorer}"])
        assert {"timings", "config", "command", "dtype", "device", "model", "flops"} <= set(r)
        assert r["timings"]["total_s"] > 0 and all(v > 0 for v in r["flops"].values() if v)
        ppl[variant] = r[f"ppl_{scorer}"]
        if variant not in ("base-w64", "nomemory"):  # the sink at position 0, then 4 memory tokens a segment
            assert [c["memory_positions"] for c in r["chunks"]] == [0, 5, 9, 13]
    assert len(set(ppl.values())) >= 4  # no memory, untrained memory and trained memory score differently
    for variant in ("recent", "reservoir", "full"):
        summary = json.loads((out / f"train-{variant}" / "uio.json").read_text())
        assert summary["steps"] == 2 and summary["tokens_seen"] == 2 * 4 * 32  # every truncation: the same steps
        assert summary["texts"] == ["t1:0", "t2:0"] and all(math.isfinite(x) for x in summary["losses"])
        tensors = load_file(out / f"train-{variant}" / "uio.safetensors")
        assert tensors["memory"].shape == (4, 64) and tensors["memory"].dtype == torch.float32
        assert "layers.0.attention.wq.encoder.lora_a" in tensors and "layers.1.attention.wq.encoder.lora_a" not in tensors
        # no layer-0 memory (the default): layer 0 has no decoder LoRA, layer 1 has
        assert "layers.0.attention.wk.decoder.lora_a" not in tensors
        assert "layers.1.attention.wk.decoder.lora_a" in tensors
    scaling = json.loads((out / "uio-scaling.json").read_text())
    assert [(e["variant"], e["tokens"]) for e in scaling["eval"]] == [
        ("base-w64", 64), ("reservoir", 64), ("base-w64", 128), ("reservoir", 128)]
    assert sorted((e["bptt"], e["segments"]) for e in scaling["train"]) == sorted(
        (b, n) for b in ("full", "recent", "reservoir") for n in (2, 3))
    assert all(e["peak_mib"] is None and e["wall_s"] > 0 for e in scaling["eval"] + scaling["train"])  # CPU: no peak

    # resumable: a second run finds everything done and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert bench_uio.main(args(ckpt, books, train, out)) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # ... and results made with other settings are refused, not mixed in
    assert bench_uio.main(args(ckpt, books, train, out, "--lr", "1e-3")) == 2


def test_uio_training_resumes_from_its_checkpoint_to_the_same_adapters(ckpt, dirs, tmp_path, monkeypatch):
    books, train = dirs
    small = ("--train-variants", "reservoir", "--scaling-tokens", "64", "--scaling-segments", "2")
    assert bench_uio.main(args(ckpt, books, train, tmp_path / "whole", *small)) == 0
    calls, real = [], bench_uio.train_step

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the first step's checkpoint
        return real(*a, **k)
    monkeypatch.setattr(bench_uio, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_uio.main(args(ckpt, books, train, tmp_path / "cut", *small))
    monkeypatch.setattr(bench_uio, "train_step", real)
    assert bench_uio.main(args(ckpt, books, train, tmp_path / "cut", *small)) == 0
    whole = load_file(tmp_path / "whole" / "train-reservoir" / "uio.safetensors")
    resumed = load_file(tmp_path / "cut" / "train-reservoir" / "uio.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_uio_bench_refuses_to_train_on_the_evaluation_books(ckpt, dirs, tmp_path, capsys):
    books, _ = dirs
    assert bench_uio.main(args(ckpt, books, books, tmp_path / "out")) == 2
    assert "never train on them" in capsys.readouterr().err


def test_uio_bench_refuses_to_score_more_tokens_than_it_trains_on(ckpt, dirs, tmp_path, capsys):
    books, train = dirs
    with pytest.raises(SystemExit) as exit_:  # 160 scored tokens = 5 segments; training texts hold 4
        bench_uio.main(args(ckpt, books, train, tmp_path / "out", "--tokens", "160"))
    assert exit_.value.code == 2 and "--tokens (160) is longer than the training texts" in capsys.readouterr().err


def test_the_memory_form_flags_reach_the_scorer_and_the_result_files(ckpt, dirs, tmp_path):
    books, train = dirs
    untrained = ("--train-variants", "", "--scaling-tokens", "", "--scaling-segments", "")  # no training, no scaling
    scored = {}
    for form, flags in {"default": (), "paper": ("--no-sink", "--layer0-memory", "--no-references")}.items():
        out = tmp_path / form
        assert bench_uio.main(args(ckpt, books, train, out, *untrained, *flags)) == 0
        assert not (out / "uio-scaling.json").exists() and not list(out.glob("train-*"))
        scored[form] = json.loads((out / "uio-untrained-349.json").read_text())
    assert (tmp_path / "default" / "uio-nomemory-349.json").exists()
    assert not list((tmp_path / "paper").glob("uio-nomemory-*")) and not list((tmp_path / "paper").glob("uio-base-*"))
    default, paper = scored["default"], scored["paper"]
    assert (default["config"]["sink"], default["config"]["layer0_memory"]) == (True, False)
    assert (paper["config"]["sink"], paper["config"]["layer0_memory"]) == (False, True)
    assert [c["memory_positions"] for c in paper["chunks"]] == [0, 4, 8, 12]
    assert [c["memory_positions"] for c in default["chunks"]] == [0, 5, 9, 13]
    assert default["ppl_uio"] != paper["ppl_uio"]
