"""bench/step_memory.py end to end on a tiny model (--quick): the saved-tensor table, the fresh-process sweep,
its resumption and its refusal of results measured with other settings."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*argv):
    return subprocess.run([sys.executable, "-m", "bench.step_memory", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_table_shows_the_lean_step_keeping_less_of_every_kind(tmp_path):
    r = run("table", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "saved-tensors.json").read_text())["rows"]
    (row,) = rows.values()
    plain, lean = sum(row["plain"].values()), sum(row["lean"].values())
    assert 0 < lean < 0.5 * plain
    masks = {f: row[f]["adapters' inputs and masks"] for f in ("plain", "lean")}
    assert 0 < masks["lean"] < masks["plain"] / 16                  # only the masks, a bit an element
    assert "| lean |" in (tmp_path / "saved-tensors.md").read_text()


def test_peak_sweep_runs_resumes_and_refuses_other_settings(tmp_path):
    r = run("peak", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    points = sorted(p.name for p in tmp_path.glob("*-*-*.json"))
    assert points == ["eval-lean-64.json", "eval-plain-64.json", "step-lean-96.json", "step-plain-96.json"]
    step = json.loads((tmp_path / "step-lean-96.json").read_text())
    assert step["peak_rss_mib"] > 0 and step["step_s"] > 0 and (step["context"], step["delta"]) == (72, 24)
    ev = {i: json.loads((tmp_path / f"eval-{i}-64.json").read_text()) for i in ("lean", "plain")}
    assert ev["lean"]["ppl_base"] == ev["plain"]["ppl_base"]
    assert abs(ev["lean"]["ppl_templora"] / ev["plain"]["ppl_templora"] - 1) < 1e-5
    assert (tmp_path / "peak.png").stat().st_size > 0

    again = run("peak", "--quick", "--out", str(tmp_path))
    assert again.returncode == 0 and again.stderr.count("done before, kept") == 4

    other = run("peak", "--quick", "--threads", "1", "--out", str(tmp_path))
    assert other.returncode != 0 and "other settings" in other.stderr
    assert json.loads((tmp_path / "step-lean-96.json").read_text()) == step     # untouched


def test_unknown_implementation_is_one_line_exit_2(tmp_path):
    r = run("peak", "--quick", "--impls", "lean,fast", "--out", str(tmp_path))
    assert r.returncode == 2 and "--impls" in r.stderr and "Traceback" not in r.stderr


def test_peak_in_bf16_with_more_steps_reports_the_median_of_all_but_the_first(tmp_path):
    r = run("peak", "--quick", "--dtype", "bfloat16", "--steps", "4", "--impls", "lean", "--eval-tokens=",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    step = json.loads((tmp_path / "step-lean-96.json").read_text())
    assert step["settings"]["dtype"] == "bfloat16" and len(step["step_times_s"]) == 3
    assert step["step_s"] == sorted(step["step_times_s"])[1] and step["first_step_s"] > 0
    assert len(step["losses"]) == 4 and all(x == x for x in step["losses"])     # four steps, no NaN
    other = run("peak", "--quick", "--dtype", "bfloat16", "--steps", "3", "--impls", "lean", "--eval-tokens=",
                "--out", str(tmp_path))
    assert other.returncode != 0 and "other settings" in other.stderr


def test_one_step_or_a_bf16_table_is_one_line_exit_2(tmp_path):
    for argv, flag in ((("peak", "--steps", "1"), "--steps"), (("table", "--dtype", "bfloat16"), "--dtype")):
        r = run(*argv, "--quick", "--out", str(tmp_path))
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr
