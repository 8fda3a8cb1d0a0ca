"""bench/supra.py runs end to end on a tiny checkpoint (--quick), writes protocol-shaped results, never trains on
an evaluation book, and resumes an interrupted uptraining to the very weights of an uninterrupted one."""
import hashlib
import json
import math

import pytest
from safetensors.torch import load_file

from bench import supra as bench_supra


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


def test_quick_run_writes_protocol_results_for_every_model_and_decode_measurements(ckpt, dirs):
    base_files = _file_hashes(ckpt)
    out = dirs / "out"
    assert bench_supra.main(_args(ckpt, dirs, out)) == 0
    for run, scorer in [("base-w128", "base"), ("supra", "supra"), ("supra-transfer", "supra-transfer")]:
        r = json.loads((out / f"supra-{run}-1.json").read_text())
        assert r["scored_tokens"] == 192 and math.isfinite(r[f"ppl_{scorer}"])
        assert {"book", "config", "command", "dtype", "device", "model", "timings"} <= set(r)
        assert r["chunks"][0]["start"] == 1 and all(f"nll_{scorer}" in c for c in r["chunks"])
    for variant in ("supra", "supra-transfer"):
        train = json.loads((out / f"supra-train-{variant}.json").read_text())
        assert train["tokens_seen"] == 1024 and all(math.isfinite(h["loss"]) for h in train["history"])
    assert json.loads((out / "supra-supra-1.json").read_text())["config"]["window"] is None
    runs = json.loads((out / "supra-decode.json").read_text())["runs"]
    assert set(runs) == {"kv_32", "kv_128", "linear_32", "linear_128"}
    assert runs["kv_128"]["memory_mib"] > runs["kv_32"]["memory_mib"]            # the KV cache grows with the text
    assert runs["linear_128"]["memory_mib"] == runs["linear_32"]["memory_mib"]   # the state does not
    assert all(r["ms_per_token"] > 0 and r["new_tokens"] == 8 for r in runs.values())
    assert (out / "supra.png").stat().st_size > 0 and "| SUPRA" in (out / "supra-summary.md").read_text()
    assert _file_hashes(ckpt) == base_files  # the base checkpoint is never written


def test_an_evaluation_book_among_the_training_books_is_refused(ckpt, dirs, capsys):
    (dirs / "train" / "1.txt").write_text("anything")
    assert bench_supra.main(_args(ckpt, dirs, dirs / "out", "--skip", "reference")) == 2
    assert "is an evaluation book" in capsys.readouterr().err


def test_an_interrupted_uptraining_resumes_to_the_weights_of_an_uninterrupted_one(ckpt, dirs, monkeypatch):
    only_train = ["--variants", "supra", "--skip", "reference,eval,decode", "--save-every", "3"]
    assert bench_supra.main(_args(ckpt, dirs, dirs / "whole", *only_train)) == 0

    real, calls = bench_supra.next_token_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 6:  # during step 6 of 8: the last checkpoint is step 3's
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(bench_supra, "next_token_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_supra.main(_args(ckpt, dirs, dirs / "resumed", *only_train))
    assert json.loads((dirs / "resumed" / "checkpoints" / "supra" / "config.json").read_text())["step"] == 3
    monkeypatch.setattr(bench_supra, "next_token_loss", real)
    assert bench_supra.main(_args(ckpt, dirs, dirs / "resumed", *only_train)) == 0

    def final(out):
        folder = out / "checkpoints" / "supra"
        return load_file(folder / json.loads((folder / "config.json").read_text())["weights"])
    whole, resumed = final(dirs / "whole"), final(dirs / "resumed")
    assert whole.keys() == resumed.keys() and all((whole[k] == resumed[k]).all() for k in whole)
    # other settings on the same checkpoint: refused, not mixed in
    assert bench_supra.main(_args(ckpt, dirs, dirs / "resumed", *only_train, "--chunk", "1")) == 2


def test_the_calibrated_group_norm_starts_the_transfer_at_a_lower_loss_than_the_official_start(ckpt, dirs):
    only_train = ["--variants", "supra-transfer", "--skip", "reference,eval,decode"]
    first = {}
    for calibration in ("softmax", "none"):
        out = dirs / calibration
        assert bench_supra.main(_args(ckpt, dirs, out, *only_train, "--calibration", calibration)) == 0
        train = json.loads((out / "supra-train-supra-transfer.json").read_text())
        assert train["settings"]["calibration"] == calibration
        first[calibration] = train["history"][0]["loss"]
        # no clipping and a constant lr, as LoLCATs' trainer (only SUPRA's own recipe clips and decays)
        assert {h["lr"] for h in train["history"] if h["phase"] == "transfer"} == {1e-2}
    assert first["softmax"] < first["none"]
    # a checkpoint made with one calibration is not resumed with the other
    assert bench_supra.main(_args(ckpt, dirs, dirs / "none", *only_train, "--calibration", "softmax")) == 2
