"""The memory and precision benchmarks run end to end on a tiny checkpoint and write what they report.

(Their figures come from real runs documented in README.md; here only the plumbing is checked, so that
the scripts do not rot. Speed is never asserted.)"""
import importlib.util
import json
import math
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = ["--delta", "32", "--context", "32", "--window", "96", "--keep", "32"]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_precision_compares_fp32_and_bf16(ckpt, book, tmp_path, capsys):
    out = tmp_path / "precision.json"
    rc = load_bench("precision").main(["--model", str(ckpt), "--text", str(book), "--tokens", "100",
                                       "--threads", "1", "--out", str(out), *TINY])
    r = json.loads(out.read_text())
    assert rc == (0 if r["within_bound"] else 1)
    f32, b16 = r["runs"]["float32"], r["runs"]["bfloat16"]
    for run in (f32, b16):
        assert math.isfinite(run["ppl_base"]) and math.isfinite(run["ppl_templora"]) and run["tokens_per_s"] > 0
    assert r["relative_diff_percent"]["ppl_templora"] == pytest.approx(100 * (b16["ppl_templora"] / f32["ppl_templora"] - 1))
    assert f32["ppl_base"] != b16["ppl_base"]  # the two runs really used different dtypes
    assert "bf16 vs fp32" in capsys.readouterr().out


def test_memory_reports_a_peak_per_run(ckpt, book, tmp_path):
    out = tmp_path / "memory.json"
    memory = load_bench("memory")
    rc = memory.main(["--model", str(ckpt), "--text", str(book), "--tokens", "128", "--threads", "1",
                      "--base-window", "128", "--out", str(out), *TINY])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"load", "templora_128", "base_128"}
    for key, run in runs.items():
        assert run["peak_rss_mib"] > 10, key
    assert runs["templora_128"]["ppl_templora"] is not None and runs["base_128"]["ppl_templora"] is None
    assert runs["base_128"]["config"]["window"] == 128
    with pytest.raises(ValueError, match="fewer than N=1000"):  # a text too short for N is an error
        memory.main(["--model", str(ckpt), "--text", str(book), "--tokens", "1000", "--skip", "load,base",
                     "--threads", "1", "--out", str(tmp_path / "m2.json"), *TINY])
