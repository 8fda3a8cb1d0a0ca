"""The memory and precision benchmarks run end to end on a tiny checkpoint and write what they report.

(Their figures come from real runs documented under docs/; here only the plumbing is checked, so that
the scripts do not rot. Speed is never asserted.)"""
import json
import math
import re

import pytest

from bench import memory, precision, speed

TINY = ["--delta", "32", "--context", "32", "--window", "96", "--keep", "32"]


def test_precision_compares_fp32_and_bf16(ckpt, book, tmp_path, capsys):
    out = tmp_path / "precision.json"
    rc = precision.main(["--model", str(ckpt), "--text", str(book), "--tokens", "100",
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


def _result(path, book, tokens, nll_per_token):
    chunks = [{"start": s, "tokens": 1024, "nll_base": 1024 * nll_per_token, "nll_templora": 1024 * (nll_per_token - 0.1),
               "flops": {"score_base": 1.0, "score_templora": 2.0, "train": 3.0}} for s in range(1, tokens, 1024)]
    r = {"book": book, "scored_tokens": tokens, "chunks": chunks, "command": "test",
         "timings": {"score_base_s": 1.0, "score_templora_s": 2.0, "train_s": 3.0}}
    path.write_text(json.dumps(r))


@pytest.mark.parametrize("one_process", [False, True])
def test_speed_times_both_stacks_each_in_a_process_of_its_own_or_together(one_process, tmp_path, capsys):
    out = tmp_path / "speed.json"
    rc = speed.main(["--model", "tiny", "--quick", "--repeats", "1", "--seq", "96", "--new-tokens", "8",
                     "--bench", "prefill,decode,step,block", "--out", str(out)] + ["--one-process"] * one_process)
    assert rc == 0
    r = json.loads(out.read_text())["models"]["tiny"]
    assert r["processes"] == ("one" if one_process else "one per stack")
    for bench in ("prefill", "decode", "step", "block"):
        x = r[bench]
        assert len(x["ours_s"]) == len(x["theirs_s"]) == 1 and x["ratio"] > 0, bench
    # the two stacks compute the same model from the same checkpoint
    assert r["prefill"]["max_abs_logit_diff"] < 0.05
    nll = r["block"]["base_nll_per_token"]
    assert nll["ours"] == pytest.approx(nll["theirs"], rel=1e-2)
    assert all(math.isfinite(v) for v in r["step"]["loss_last"].values())
    if one_process:
        assert "peak_rss_mib" not in r
    else:  # each process's own peak: loading torch alone takes more than 100 MiB
        assert min(r["peak_rss_mib"].values()) > 100
    assert "## tiny" in capsys.readouterr().out


def test_a_stack_whose_process_fails_raises_with_its_traceback(tmp_path):
    a = speed.parse_args(["--model", "tiny", "--quick"])
    with pytest.raises(RuntimeError, match=r"(?s)process failed.*" + re.escape(str(tmp_path / "missing"))):
        speed.Remote("ours", tmp_path / "missing", [1, 2, 3], a)


def test_compare_tabulates_every_row_and_refuses_different_books(tmp_path, capsys):
    from bench import compare
    for book in ("1", "2"):
        _result(tmp_path / f"main-{book}.json", book, 8192, 3.0)
        _result(tmp_path / f"base-w8192-{book}.json", book, 8192, 2.9)
    assert compare.main(["--results", str(tmp_path)]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert f"**{math.exp(3.0):.2f}**" in rows["base, W=2K"] and f"**{math.exp(2.9):.2f}**" in rows["Temp-LoRA, W=2K"]
    assert f"{2 * 8 * 5.0:.3g}" in rows["Temp-LoRA, W=2K"]  # score_templora + train FLOPs of 8 blocks x 2 books
    (tmp_path / "bpt" / "books-cpu").mkdir(parents=True)  # a CPU-sized run: book 2, its first 4096 tokens
    _result(tmp_path / "bpt" / "books-cpu" / "bpt-LT4096-2.json", "2", 4096, 2.5)
    assert compare.main(["--results", str(tmp_path)]) == 0
    part = next(line for line in (tmp_path / "compare.md").read_text().splitlines()
                if line.startswith("| Temp-LoRA, W=2K, L_T=4K (blockwise, CPU run) |"))
    # next to the first row (base, W=2K) on the same 4 blocks of book 2: exp(2.4) against exp(3.0)
    assert f"**{math.exp(2.4):.2f}**" in part and f"{math.exp(3.0):.2f} (base, W=2K)" in part and "| 2 | 4096 |" in part
    assert f"{100 * (math.exp(2.4 - 3.0) - 1):+.1f}%" in part
    _result(tmp_path / "bpt" / "books-cpu" / "bpt-LT4096-2.json", "2", 1000, 2.5)  # ends inside a block
    assert compare.main(["--results", str(tmp_path)]) == 2
    assert "do not end on a block" in capsys.readouterr().err
    (tmp_path / "bpt" / "books-cpu" / "bpt-LT4096-2.json").unlink()
    _result(tmp_path / "base-w8192-2.json", "3", 8192, 2.9)  # one row now covers another book
    assert compare.main(["--results", str(tmp_path)]) == 2
    assert "covers books" in capsys.readouterr().err
