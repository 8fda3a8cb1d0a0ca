"""bench/runs.py: result files side by side, numbers computed from the files' own NLLs."""
import json
import math

from bench.runs import main


def result(nlls, rank=64, targets="all", complete=True, tokens=4, text="book.txt"):
    chunks = [{"start": 1 + tokens * i, "tokens": tokens, "nll_base": 10.0 + i, "nll_templora": nll}
              for i, nll in enumerate(nlls)]
    return {"text": text, "scored_tokens": tokens * len(nlls), "chunks": chunks, "complete": complete,
            "config": {"rank": rank, "targets": targets, "delta": tokens, "lr": 3e-4}, "timings": {"total_s": 5.0}}


def write(tmp_path, name, r):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return str(path)


def test_report_lists_the_differing_knobs_the_perplexities_and_the_change_against_the_first(tmp_path, capsys):
    a = write(tmp_path, "a", result([8.0, 6.0]))
    b = write(tmp_path, "b", result([8.0, 4.0], rank=8, targets="attn", complete=False))
    md, png = tmp_path / "r.md", tmp_path / "p.png"
    assert main([a, b, "--md", str(md), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out == md.read_text()
    knobs = out.split("## Perplexity")[0]
    assert "| run | rank | targets |" in knobs and "| b | 8 | attn |" in knobs and "Shared: delta=4, lr=0.0003" in knobs
    pa, pb = math.exp(14 / 8), math.exp(12 / 8)
    assert f"| a | templora | {pa:.3f} | +0.00% |" in out
    assert f"| b | templora | {pb:.3f} | {100 * (pb / pa - 1):+.2f}% |" in out and "**no: incomplete**" in out
    assert f"ppl {math.exp(21 / 8):.3f}" in out  # the base model once: both runs scored it alike
    assert "| 0-4K | 8 |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_on_other_tokens_or_missing_files_are_one_line_exit_2(tmp_path, capsys):
    a = write(tmp_path, "a", result([8.0, 6.0]))
    other = write(tmp_path, "other", result([8.0, 6.0, 5.0]))
    assert main([a, other]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {other}: scored 12 tokens") and err.count("\n") == 1
    assert main([a, str(tmp_path / "none.json")]) == 2
    assert "none.json: file not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main([a, str(tmp_path / "bad.json")]) == 2 and "not a JSON result" in capsys.readouterr().err


def test_two_real_eval_runs_that_differ_in_rank(ckpt, book, tmp_path, capsys):
    from cli import main as cli
    knobs = ["--model", str(ckpt), "--text", str(book), "--delta", "32", "--context", "16", "--window", "96",
             "--keep", "32", "--quiet"]
    assert cli(["eval", *knobs, "--rank", "4", "--out", str(tmp_path / "r4.json")]) == 0
    assert cli(["eval", *knobs, "--rank", "8", "--out", str(tmp_path / "r8.json")]) == 0
    capsys.readouterr()
    assert main([str(tmp_path / "r4.json"), str(tmp_path / "r8.json")]) == 0
    knobs = capsys.readouterr().out.split("## Perplexity")[0]
    assert "| run | alpha | rank |" in knobs and "| r8 | 8.0 | 8 |" in knobs
