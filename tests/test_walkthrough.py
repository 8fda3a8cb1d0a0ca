"""docs/walkthrough.md stays true: its breakpoints point at the lines it names, and every exercise command in it
runs (on a tiny checkpoint, at 1/16 of the sizes) and does what the exercise says it does."""
import json
import math
import re
import shlex

import pytest

from bench import runs
from cli import REPO, main

DOC = (REPO / "docs" / "walkthrough.md").read_text(encoding="utf-8")
SIZES = ("--delta", "--context", "--window", "--keep")  # divided by 16 for the tiny checkpoint (max 256 positions)


def test_each_breakpoint_is_the_line_the_walkthrough_says():
    rows = re.findall(r"\| `([\w/]+\.py):(\d+)` \| `([^`]+)` \|", DOC)
    assert len(rows) >= 7
    for file, line, code in rows:
        text = (REPO / file).read_text(encoding="utf-8").splitlines()[int(line) - 1]
        assert code.rstrip(".").rstrip() in text, f"{file}:{line} is now {text.strip()!r}, the walkthrough says {code!r}"
    for file, line in re.findall(r"`(templora\.py|protocol\.py):(\d+)`", DOC):
        assert int(line) <= len((REPO / file).read_text().splitlines())


def exercise_commands() -> dict[str, list[str]]:
    """{'attn': [argv...], ...}: every `python templora.py eval` line of the walkthrough, by its --out stem."""
    commands = {}
    for line in DOC.splitlines():
        line = line.strip()
        if line.startswith("python templora.py eval"):
            argv = shlex.split(line)[2:]
            commands[re.search(r"runs/([\w-]+)\.json", line)[1]] = argv
    return commands


def tiny(argv: list[str], ckpt, text, out_dir) -> list[str]:
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in SIZES:
            argv[i + 1] = str(int(argv[i + 1]) // 16)
        elif arg == "--model":
            argv[i + 1] = str(ckpt)
        elif arg == "--text":
            argv[i + 1] = str(text)
        elif arg == "--out":
            argv[i + 1] = str(out_dir / argv[i + 1])
    return argv  # ranks as written: 64 and 8 fit the tiny model too


@pytest.fixture(scope="module")
def exercise_runs(ckpt, tmp_path_factory):
    """Every exercise command, run on the tiny checkpoint over 321 bytes of the demo's text (10 blocks of 32)."""
    folder = tmp_path_factory.mktemp("walkthrough")
    text = folder / "excerpt.txt"
    text.write_text((REPO / "data" / "harvester.txt").read_text(encoding="utf-8")[:320], encoding="utf-8")
    results = {}
    for name, argv in exercise_commands().items():
        assert main(tiny(argv, ckpt, text, folder) + ["--quiet"]) == 0, name
        results[name] = json.loads((folder / "runs" / f"{name}.json").read_text())
    return folder, results


def test_the_walkthrough_has_at_least_five_exercises_each_with_its_command():
    assert {"all", "attn", "no-reuse", "rank8", "delta256", "context0"} <= set(exercise_commands())
    assert len(re.findall(r"^\d\. \*\*", DOC, flags=re.M)) >= 5


def test_exercise_attention_only_adapter_covers_the_four_attention_projections(exercise_runs, ckpt):
    _, r = exercise_runs
    cfg = json.loads((ckpt / "config.json").read_text())
    dim, layers, rank = cfg["hidden_size"], cfg["num_hidden_layers"], r["attn"]["config"]["rank"]
    kv = cfg["num_key_value_heads"] * dim // cfg["num_attention_heads"]
    assert r["attn"]["config"]["targets"] == "attn"
    assert r["attn"]["adapter_parameters"] == layers * rank * (2 * (dim + dim) + 2 * (dim + kv))  # wq wo, wk wv
    ffn = layers * rank * 3 * (dim + cfg["intermediate_size"])
    assert r["all"]["adapter_parameters"] == r["attn"]["adapter_parameters"] + ffn


def test_exercise_no_cache_reuse_recomputes_before_every_block_but_the_first(exercise_runs):
    _, r = exercise_runs
    flags = [c["recomputed"] for c in r["no-reuse"]["chunks"]]
    assert flags[0] is False and all(flags[1:]) and r["no-reuse"]["recomputes"]["templora"] == len(flags) - 1
    assert sum(c["recomputed"] for c in r["all"]["chunks"]) < len(flags) - 1  # with reuse: only at overflows


def test_exercise_rank_8_keeps_the_scale_at_1_with_8_times_fewer_parameters(exercise_runs):
    _, r = exercise_runs
    small, big = r["rank8"]["config"], r["all"]["config"]
    assert small["alpha"] / small["rank"] == big["alpha"] / big["rank"] == 1.0
    assert r["all"]["adapter_parameters"] == 8 * r["rank8"]["adapter_parameters"]


def test_exercise_delta_halved_doubles_the_blocks_and_the_updates(exercise_runs):
    _, r = exercise_runs
    half, full = r["delta256"]["chunks"], r["all"]["chunks"]
    assert len(half) == 2 * len(full) and sum(len(c["train_loss"]) for c in half) == 2 * sum(
        len(c["train_loss"]) for c in full)
    assert sum(c["tokens"] for c in half) == sum(c["tokens"] for c in full)


def test_exercise_context_0_trains_on_the_block_alone(exercise_runs):
    _, r = exercise_runs
    assert all(c["train_context"] == 0 for c in r["context0"]["chunks"])
    assert any(c["train_context"] > 0 for c in r["all"]["chunks"])


def test_exercise_base_alone_trains_nothing(exercise_runs):
    _, r = exercise_runs
    assert r["base"]["ppl_templora"] is None and "train_loss" not in r["base"]["chunks"][0]
    assert r["base"]["ppl_base"] == pytest.approx(r["all"]["ppl_base"], rel=1e-9)


def test_the_walkthroughs_runs_command_compares_the_exercises(exercise_runs, capsys):
    folder, r = exercise_runs
    line = next(line.strip() for line in DOC.splitlines() if line.strip().startswith("python -m bench.runs"))
    argv = [str(folder / a) if a.startswith("runs/") else a for a in shlex.split(line)[3:]]
    assert runs.main(argv) == 0
    report = (folder / "runs" / "report.md").read_text()
    assert report == capsys.readouterr().out
    for knob in ("targets", "cache_reuse", "rank", "delta", "context"):
        assert knob in report.split("## Perplexity")[0]
    ppl = math.exp(sum(c["nll_templora"] for c in r["attn"]["chunks"]) / r["attn"]["scored_tokens"])
    assert f"| attn | templora | {ppl:.3f} |" in report
    assert (folder / "runs" / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
