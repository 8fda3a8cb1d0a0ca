"""bench/step_ab.py on a tiny model (--quick): two checkouts' steps alternate in two processes; a folder that is
not a checkout is refused before anything runs; a checkout that fails reports which one, in one line."""
import json
import subprocess
import sys
from pathlib import Path

from bench.step_ab import NEEDED

REPO = Path(__file__).resolve().parent.parent


def run(*argv):
    return subprocess.run([sys.executable, "-m", "bench.step_ab", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_two_checkouts_take_steps_in_turn(tmp_path):
    out = tmp_path / "ab.json"
    r = run(str(REPO), str(REPO), "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2
    for row in result["rounds"]:
        assert row["a"] > 0 and row["b"] > 0 and row["a_rss_mib"] > 0 and row["b_rss_mib"] > 0
    assert result["ratio_a_over_b_median"] == (result["rounds"][0]["a"] / result["rounds"][0]["b"]
                                               + result["rounds"][1]["a"] / result["rounds"][1]["b"]) / 2
    assert result["rounds_a_faster"] == sum(row["a"] < row["b"] for row in result["rounds"])
    assert result["checkouts"]["a"] == result["checkouts"]["b"]
    assert "warm-up a" in r.stderr and "round 2/2" in r.stderr and "a faster in" in r.stdout


def test_each_process_runs_its_own_checkout(tmp_path):
    """Checkout b: this repository's modules, its train_block 0.3 s slower; a's steps stay fast, b's do not."""
    for f in REPO.glob("*.py"):
        (tmp_path / f.name).write_text(f.read_text())
    with open(tmp_path / "train_block.py", "a") as f:
        f.write("\n_train_block = train_block\n\n\ndef train_block(*args, **kwargs):\n"
                "    import time\n    time.sleep(0.3)\n    return _train_block(*args, **kwargs)\n")
    out = tmp_path / "ab.json"
    r = run(str(REPO), str(tmp_path), "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rounds = json.loads(out.read_text())["rounds"]
    assert all(row["b"] > row["a"] + 0.25 for row in rounds), rounds


def test_a_checkout_that_prints_does_not_break_the_messages(tmp_path):
    for f in REPO.glob("*.py"):
        (tmp_path / f.name).write_text(f.read_text())
    with open(tmp_path / "train_block.py", "a") as f:
        f.write("\nprint('progress', end='\\r')\n")
    r = run(str(tmp_path), str(REPO), "--quick")
    assert r.returncode == 0, r.stderr
    assert "progress" in r.stderr


def test_bad_flags_are_refused(tmp_path):
    for argv, says in ((["--quick", "--rounds", "3"], "--quick: runs 64 tokens and 2 rounds"),
                       (["--rounds", "0"], "--rounds: at least 1"),
                       (["--quick", "--out", str(tmp_path / "no" / "ab.json")], "--out: no folder")):
        r = run(str(REPO), str(REPO), *argv)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path):
    r = run(str(REPO), str(tmp_path), "--quick")
    assert r.returncode == 2
    assert f"B_DIR: {tmp_path} is not a checkout" in r.stderr and "Traceback" not in r.stderr


def test_a_checkout_that_fails_is_named(tmp_path):
    for name in NEEDED:
        (tmp_path / name).write_text("raise ImportError('an older layout')\n")
    r = run(str(REPO), str(tmp_path), "--quick")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (f"error: checkout b ({tmp_path}): ImportError: an older layout")
    assert "Traceback" not in r.stderr
