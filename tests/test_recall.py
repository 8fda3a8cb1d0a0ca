"""bench/recall.py (synthetic recall for UIO-LLMs' truncations) as specifications: the texts hold the key in
segment 0 and ask for it at the end of segment k, with the loss on the answer only; the grid writes one
result per (variant, k, seed), resumes without recomputing, refuses other settings, and writes the table and
the plot. (The accuracies come from the real run; only the task and the plumbing are checked here.)"""
import json

import pytest
import torch

from bench import recall


def test_a_text_states_the_key_in_segment_0_and_asks_for_it_after_query_at_the_end_of_segment_k():
    task, k, n = recall.Task(segment=12, values=5, filler=7, distractors=2), 3, 50
    ids, answer, keys = recall.make_texts(task, k, n, torch.Generator().manual_seed(0))
    L, S = task.segment, k + 1
    assert ids.shape == (n, S * L + 1) and answer.shape == (n, S * L)
    assert answer.sum(1).tolist() == [1] * n and answer[:, S * L - 1].all()  # one target per text: the answer
    assert (ids[:, S * L] == keys).all() and (ids[:, S * L - 1] == recall.QUERY).all()
    assert (ids[:, 0] == recall.BOS).all()
    for text, key in zip(ids, keys):
        marks = (text == recall.MARK).nonzero().flatten().tolist()
        assert len(marks) == 1 and marks[0] < L - 1 and text[marks[0] + 1] == key  # MARK key, inside segment 0
        assert (text == recall.QUERY).sum() == 1 and (text == recall.BOS).sum() == 1
        values = (text >= 3) & (text < 3 + task.values)
        assert values[L * k:S * L].sum() == 0  # the question's segment holds no value but the answer
        for s in range(k):  # every earlier segment: its distractors (and segment 0 the key too)
            assert values[s * L:(s + 1) * L].sum() == task.distractors + (s == 0)


def args(out, *more):
    return ["--quick", "--out", str(out), *more]


def test_the_quick_grid_writes_each_unit_a_table_and_a_plot_and_resumes(tmp_path):
    out = tmp_path / "recall"
    assert recall.main(args(out)) == 0
    units = {(v, k, s) for v in recall.VARIANTS for k in (1, 2, 3) for s in (0, 1)}
    for v, k, s in units:
        r = json.loads((out / f"recall-{v}-k{k}-seed{s}.json").read_text())
        assert (r["variant"], r["k"], r["seed"]) == (v, k, s) and 0 <= r["accuracy"] <= 1
        assert len(r["losses"]) == r["steps"] == 3 and r["tokens_seen"] == 3 * 4 * (k + 1) * 16
    summary = json.loads((out / "recall.json").read_text())
    assert {(u["variant"], u["k"], u["seed"]) for u in summary["units"]} == units
    table = (out / "recall.md").read_text().splitlines()
    assert len(table) == 2 + len(recall.VARIANTS) and "k = 1 (within reach)" in table[0] and "k = 3 |" in table[0]
    assert (out / "recall.png").stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("recall-*.json")}
    assert recall.main(args(out)) == 0  # resumed: every unit found done, none recomputed
    assert {p: p.stat().st_mtime_ns for p in out.glob("recall-*.json")} == stamps
    assert recall.main(args(out, "--lr", "1e-2")) == 2  # other settings: refused, never mixed in


def test_full_bptt_and_recent_only_are_the_same_when_the_key_is_within_reach(tmp_path):
    """k = 2 with 2 live graphs: segment 0's encoder graph is still live when segment 2 is read, so recent-only
    and full BPTT compute the same gradients and end with the same accuracy and losses (the reservoir, which
    keeps its first 2 samples, too)."""
    out = tmp_path / "recall"
    assert recall.main(args(out, "--ks", "2", "--seeds", "0", "--variants", "recent,full,reservoir")) == 0
    r = {v: json.loads((out / f"recall-{v}-k2-seed0.json").read_text()) for v in ("recent", "full", "reservoir")}
    assert r["recent"]["losses"] == pytest.approx(r["full"]["losses"], rel=1e-5)
    assert r["reservoir"]["losses"] == pytest.approx(r["full"]["losses"], rel=1e-5)


@pytest.mark.parametrize("flags, culprit", [(("--variants", "nomemory,lstm"), "--variants"),
                                            (("--ks", "2,x"), "--ks"), (("--steps", "0"), "--steps"),
                                            (("--segment", "4"), "--segment")])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, culprit):
    with pytest.raises(SystemExit) as exit_:
        recall.main(args(tmp_path / "out", *flags))
    assert exit_.value.code == 2 and culprit in capsys.readouterr().err
