"""On a fresh clone, without the model or the books, every benchmark says in one line which flag is missing
and how to get it, and exits 2: never a traceback, and before any heavy work or any output is written."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What exists in each setting: "model" a checkpoint folder with a config.json (all the check looks at),
# "eval" the evaluation books supra and uio read by default (349, 718, 1684, 2021).
SETTINGS = {"fresh": set(), "model": {"model"}, "model+eval": {"model", "eval"}}
# (setting, python -m bench.<argv>, the flag the one line must name)
CASES = [
    ("fresh", ["replicate"], "--model"),
    ("fresh", ["speed"], "--smollm2-dir"),
    ("fresh", ["memory"], "--model"),
    ("fresh", ["precision"], "--model"),
    ("fresh", ["parity_smollm2"], "--model"),
    ("fresh", ["dcis", "--out", "{out}"], "--model"),
    ("fresh", ["supra", "--out", "{out}"], "--model"),
    ("fresh", ["uio", "--out", "{out}"], "--model"),
    ("fresh", ["bpt", "books", "--model", "{model}", "--out", "{out}"], "--model"),
    ("fresh", ["bpt", "table", "--model", "{model}", "--out", "{out}"], "--model"),
    ("fresh", ["step_memory", "table", "--out", "{out}"], "--model"),
    ("fresh", ["passkey", "--out", "{out}"], "--model"),
    ("fresh", ["lolcats", "--out", "{out}"], "--model"),
    ("model", ["replicate"], "--books-dir"),
    ("model", ["speed"], "--book"),
    ("model", ["memory"], "--text"),
    ("model", ["precision"], "--text"),
    ("model", ["parity_smollm2"], "--book"),
    ("model", ["dcis", "--out", "{out}"], "--train-books-dir"),
    ("model", ["supra", "--out", "{out}"], "--books-dir"),
    ("model", ["uio", "--out", "{out}"], "--books-dir"),
    ("model", ["bpt", "books", "--model", "{model}", "--out", "{out}"], "--books-dir"),
    ("model", ["step_memory", "peak", "--out", "{out}"], "--text"),
    ("model", ["passkey", "--out", "{out}"], "--books-dir"),
    ("model", ["lolcats", "--out", "{out}"], "--books-dir"),
    ("model+eval", ["supra", "--out", "{out}"], "--train-books-dir"),
    ("model+eval", ["uio", "--out", "{out}"], "--train-books-dir"),
    # dcis searches on 349 here, so that its training book is there; of its evaluation books 17769 is missing
    ("model+eval", ["dcis", "--out", "{out}", "--train-books-dir", "{eval}", "--search-book", "349"], "--books-dir"),
]

# Runs each case as `python -m` does (runpy, __main__), one after the other in one interpreter per setting:
# a fresh interpreter per case would import torch 22 times. Anything a case prints is captured, an uncaught
# exception as its traceback.
RUNNER = """
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.load(sys.stdin):
    sys.argv = [f"bench/{argv[0]}.py", *argv[1:]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(f"bench.{argv[0]}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if isinstance(e.code, str):  # sys.exit("message") prints it
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code or 0, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, sys.__stdout__)
"""


def run_setting(root: Path, setting: str) -> list[dict]:
    present = SETTINGS[setting]
    home, books, model, out = (root / setting / d for d in ("home", "books", "model", "out"))
    for d in (home, books, model):
        d.mkdir(parents=True)
    if "model" in present:
        (model / "config.json").write_text("{}")
    if "eval" in present:
        (books / "pg19-templora40").mkdir()
        for i in ("349", "718", "1684", "2021"):
            (books / "pg19-templora40" / f"{i}.txt").write_text("a book")
    cases = [(n, argv) for n, (s, argv, _) in enumerate(CASES) if s == setting]
    where = {"model": model, "eval": books / "pg19-templora40"}
    argvs = [[a.format(out=out / str(n), **where) for a in argv] for n, argv in cases]
    env = os.environ | {"HOME": str(home), "TEMPLORA_BOOKS_DIR": str(books), "TEMPLORA_MODEL_DIR": str(model)}
    p = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(argvs), cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    for r, (n, _) in zip(results, cases):
        r["case"], r["out_made"] = n, (out / str(n)).exists()
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("fresh-clone")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {r["case"]: r for rs in pool.map(lambda s: run_setting(root, s), SETTINGS) for r in rs}


@pytest.mark.parametrize("n", range(len(CASES)), ids=[f"{s}-{'-'.join(a[:2] if a[0] == 'bpt' else a[:1])}"
                                                      for s, a, _ in CASES])
def test_a_benchmark_without_its_model_or_books_says_so_in_one_line(outcomes, n):
    r, flag = outcomes[n], CASES[n][2]
    assert r["code"] == 2, r["stderr"]
    assert "Traceback" not in r["stderr"] and r["stdout"] == ""
    assert r["stderr"].count("\n") == 1 and r["stderr"].startswith("error: "), r["stderr"]
    assert f"({flag})" in r["stderr"] and f"pass {flag} " in r["stderr"]
    how = "python -m tools.smollm2" if flag in ("--model", "--smollm2-dir") else "python -m tools.pg19"
    assert how in r["stderr"]
    assert not r["out_made"]  # nothing written before the check


def test_no_tracked_file_points_at_a_folder_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    needle = "shared" + "/data"  # in two pieces, so that this file does not hold it
    holding = [f for f in files if (REPO / f).is_file() and needle in (REPO / f).read_text(errors="replace")]
    assert holding == []
