"""No flag is accepted and ignored: every flag of every subcommand of templora.py (eval, generate, demo --tiny),
run with a value other than the baseline's, either changes what the run does or is refused with exit 2.

"What the run does" is what it computes: the per-block numbers of an eval (NLLs, train losses, recomputes, the
tokens scored), the text of a generation, the demo's printed numbers; never the recorded config, which would
change with any flag. A flag that by design computes the same numbers (--blockwise) or acts on the process
(--threads) is checked by what it does (the blockwise loss is called; torch's thread count is set)."""
import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import cli
from cli import build_parser, main
from helpers import CKPT_CONFIG, write_byte_tokenizer, write_hf_checkpoint
from methods import bpt

EXCERPT = (cli.REPO / "data" / "harvester.txt").read_text(encoding="utf-8")[:400]
TINY_KNOBS = ["--delta", "32", "--context", "16", "--window", "96", "--keep", "32", "--rank", "4", "--lr", "1e-2"]

# flag -> the value(s) to try instead of the baseline's; "OTHER_MODEL" / "OTHER_TEXT" / "OUT2" are filled in below
EVAL = {
    "--model": ["OTHER_MODEL"], "--text": ["OTHER_TEXT"], "--dtype": ["bfloat16"], "--device": ["cuda"],
    "--threads": ["1"], "--delta": ["16"], "--context": ["8"], "--window": ["128"], "--keep": ["16"],
    "--rank": ["8"], "--alpha": ["16"], "--targets": ["attn"], "--dropout": ["0"], "--lr": ["2e-2"],
    "--warmup-blocks": ["0"], "--epochs": ["1"], "--seed": ["1"], "--no-cache-reuse": [], "--blockwise": ["8"],
    "--quiet": [], "--max-tokens": ["100"], "--base-window": ["160"], "--no-templora": [], "--out": ["OUT2"],
}
GENERATE = {k: v for k, v in EVAL.items() if k not in ("--text", "--max-tokens", "--base-window")} | {
    "--prompt-file": ["OTHER_TEXT"], "--max-new-tokens": ["40"], "--temperature": ["0"], "--top-p": ["0.5"]}
DEMO = {k: v for k, v in EVAL.items() if k not in ("--text", "--max-tokens", "--base-window", "--no-templora",
                                                     "--quiet", "--out", "--model")} | {
    "--model": ["OTHER_MODEL"], "--tokens": ["129"], "--tiny": None}  # --tiny: the baseline itself (see below)


@pytest.fixture(scope="module")
def paths(ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flags")
    other = folder / "other-ckpt"
    write_hf_checkpoint(other, seed=1, shard=False, **CKPT_CONFIG)
    write_byte_tokenizer(other)
    (folder / "a.txt").write_text(EXCERPT[:230], encoding="utf-8")
    (folder / "b.txt").write_text(EXCERPT[170:], encoding="utf-8")
    return {"model": ckpt, "other_model": other, "text": folder / "a.txt", "other_text": folder / "b.txt",
            "out": folder / "base.out", "out2": folder / "flag.out"}


def what_eval_did(out) -> dict:
    r = json.loads(out.read_text())
    keep = ("start", "tokens", "nll_base", "nll_templora", "train_loss", "recomputed", "train_context")
    return {"chunks": [{k: c.get(k) for k in keep} for c in r["chunks"]], "adapter": r.get("adapter_parameters")}


def demo_numbers(stdout: str) -> str:
    """The demo's output less its clock readings."""
    return re.sub(r"\[\d+s\]|; \d+s$", "", stdout, flags=re.M)


observed_threads: list[int] = []  # torch's thread count at the end of each run (--threads sets it)


def run(argv: list[str]) -> tuple[int, str, str]:
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    finally:
        observed_threads.append(torch.get_num_threads())
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def argv_for(command: str, paths: dict, flag: str | None = None, values=()) -> list[str]:
    subst = {"OTHER_MODEL": str(paths["other_model"]), "OTHER_TEXT": str(paths["other_text"]),
             "OUT2": str(paths["out2"])}
    values = [subst.get(v, v) for v in values]
    knobs = TINY_KNOBS
    if flag == "--no-templora":  # the adapter's knobs would be refused with it (test below): the window's only
        knobs = ["--delta", "32", "--window", "96", "--keep", "32"]
    if command == "eval":
        base = ["eval", "--model", str(paths["model"]), "--text", str(paths["text"]), "--out", str(paths["out"]),
                *knobs]
    elif command == "generate":  # sampled, so that --top-p and --seed have something to act on
        base = ["generate", "--model", str(paths["model"]), "--prompt-file", str(paths["text"]), "--out",
                str(paths["out"]), "--max-new-tokens", "70", "--temperature", "1.0", *knobs]
    else:
        base = ["demo", "--tiny", "--tokens", "257", "--delta", "64", "--context", "64", "--window", "192",
                "--keep", "64", "--rank", "4"]
    if flag is None:
        return base
    if flag in base:  # replace the baseline's value
        i = base.index(flag)
        return base[:i + 1] + values + base[i + 2:]
    return base + [flag, *values]


def observe(command: str, paths: dict, out: str, err: str) -> dict:
    """What the run did, read from what it wrote (and where), the text it generated, the numbers it printed."""
    target = paths["out2"] if paths["out2"].exists() else paths["out"]
    if command == "eval":
        return {"did": what_eval_did(target), "where": target.name, "progress": err != ""}
    if command == "generate":
        log = [line for line in err.splitlines() if "tok/s" not in line]
        return {"text": target.read_bytes(), "where": target.name, "log": log}
    return {"stdout": demo_numbers(out)}


_baselines: dict[str, dict] = {}


def baseline(command: str, paths: dict) -> dict:
    if command not in _baselines:
        for p in (paths["out"], paths["out2"]):
            p.unlink(missing_ok=True)
        code, out, err = run(argv_for(command, paths))
        assert code == 0, err
        _baselines[command] = observe(command, paths, out, err)
    return _baselines[command]


@pytest.mark.parametrize("command, flags", [("eval", EVAL), ("generate", GENERATE), ("demo", DEMO)])
def test_the_table_below_covers_every_flag_of_the_subcommand(command, flags):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    accepted = {s for action in sub._actions for s in action.option_strings if s not in ("-h", "--help")}
    assert accepted == set(flags), f"flags without a row here: {accepted - set(flags)}; rows for no flag: " \
                                   f"{set(flags) - accepted}"


CASES = [(c, f) for c, table in (("eval", EVAL), ("generate", GENERATE), ("demo", DEMO)) for f in table
         if table[f] is not None]


@pytest.mark.parametrize("command, flag", CASES, ids=[f"{c} {f}" for c, f in CASES])
def test_every_flag_changes_what_the_run_does_or_is_refused(paths, monkeypatch, command, flag):
    table = {"eval": EVAL, "generate": GENERATE, "demo": DEMO}[command]
    before = baseline(command, paths)
    for p in (paths["out"], paths["out2"]):
        p.unlink(missing_ok=True)
    calls = []
    real_block_loss = bpt.block_loss
    monkeypatch.setattr(bpt, "block_loss", lambda *a, **k: calls.append(k) or real_block_loss(*a, **k))
    code, out, err = run(argv_for(command, paths, flag, table[flag]))
    if code == 2:  # refused: one line naming the flag (--device cuda where there is none, --model with --tiny)
        assert err.startswith("error: ") and err.count("\n") == 1 and flag in err, err
        assert flag in ("--device", "--model") and (flag != "--device" or not torch.cuda.is_available()), err
        return
    assert code == 0, err
    if flag == "--blockwise":  # the same numbers by design (tests/test_bpt.py); what it does is use BPT's step
        assert calls and all(k.get("q_block") == 8 for k in calls)
        return
    if flag == "--threads":
        assert observed_threads[-1] == 1
        return
    assert observe(command, paths, out, err) != before


@pytest.mark.parametrize("argv, message", [
    (["--no-templora", "--rank", "8"], "--rank: has no effect with --no-templora"),
    (["--no-templora", "--targets", "attn"], "--targets: has no effect with --no-templora"),
    (["--no-templora", "--seed", "3"], "--seed: has no effect with --no-templora"),
    (["--no-templora", "--base-window", "160"], "--base-window: has no effect with --no-templora"),
])
def test_adapter_flags_with_no_templora_are_refused(ckpt, paths, tmp_path, capsys, argv, message):
    window = ["--delta", "32", "--window", "96", "--keep", "32"]
    code = main(["eval", "--model", str(ckpt), "--text", str(paths["text"]), "--out", str(tmp_path / "r.json"),
                 *window, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_top_p_under_greedy_decoding_is_refused(ckpt, paths, tmp_path, capsys):
    code = main(["generate", "--model", str(ckpt), "--prompt-file", str(paths["text"]), "--out", str(tmp_path / "o"),
                 *TINY_KNOBS, "--top-p", "0.5"])
    assert code == 2 and "--top-p 0.5: has no effect with --temperature 0" in capsys.readouterr().err
