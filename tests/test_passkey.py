"""The passkey probe (bench/passkey.py): its scorer, its needle and keys, and the whole run on a tiny checkpoint."""
import json
import math
import random
import shutil

import pytest

from bench import passkey
from load_llama import load_tokenizer, read_json


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt, read_json(ckpt / "config.json"))


@pytest.fixture()
def books(tmp_path, book):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in (7, 11):
        (folder / f"{i}.txt").write_text(book.read_text() * 2)
    return folder


def test_distractors_are_distinct_never_the_key_and_key_i_does_not_depend_on_the_grid():
    pairs = passkey.make_keys(seed=3, n_keys=300, n_distractors=9)
    for key, distractors in pairs:
        assert key not in distractors and len(set(distractors)) == 9
        assert all(len(k) == 5 and k.isdigit() and k[0] != "0" for k in [key, *distractors])
    assert passkey.make_keys(3, 4, 9) == pairs[:4]
    assert passkey.make_keys(4, 4, 9) != pairs[:4]
    few = passkey.make_keys(0, 50, 8, digits=1)  # 1-digit keys: the 8 distractors are all the other digits
    assert all(sorted([k, *d]) == [str(i) for i in range(1, 10)] for k, d in few)
    with pytest.raises(ValueError, match="--distractors"):
        passkey.make_keys(0, 1, 9, digits=1)


@pytest.mark.parametrize("length", [40, 97, 500])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_the_needle_lands_at_the_requested_depth_in_tokens(length, depth):
    haystack = [1000 + i for i in range(1000)]  # token 0 (1000) stands for the BOS
    needle = [1, 2, 3, 4, 5, 6, 7]
    ids, at = passkey.plant(haystack, needle, length, depth)
    assert len(ids) == length and ids[at:at + len(needle)] == needle
    assert abs(at - depth * (length - len(needle))) <= 0.5 or (depth == 0 and at == 1)  # BOS stays first
    assert [t for t in ids if t >= 1000] == haystack[:length - len(needle)]  # the haystack, in order
    with pytest.raises(ValueError, match="haystack"):
        passkey.plant(haystack[:10], needle, length + 20, depth)


class CopyReading:
    """A model that copies: it finds the key after "The pass key is" in what it read and puts all its
    probability on it."""

    def __init__(self, tok, text):
        self.tok = tok
        self.key = passkey.answer_digits(tok.decode(text).split("The pass key is", 1)[1])

    def loglik(self, tokens):
        return 0.0 if self.tok.decode(tokens) == f" {self.key}" else -20.0 * len(tokens)

    def greedy(self, n):
        return self.tok.encode(f" {self.key}. The")[:n]


class UniformReading:
    """Uniform output: every token has probability 1/V, whatever came before."""

    def __init__(self, vocab):
        self.vocab = vocab

    def loglik(self, tokens):
        return -len(tokens) * math.log(self.vocab)

    def greedy(self, n):
        return [ord("x")] * n


class NoiseReading:
    """Output that ignores the text: each candidate's log-likelihood is a random number."""

    def __init__(self, rng):
        self.rng = rng

    def loglik(self, tokens):
        return self.rng.gauss(-30.0, 3.0)

    def greedy(self, n):
        return [ord(str(self.rng.randrange(10))) for _ in range(n)]


def probe_text(tok, key, length=300, depth=0.5):
    haystack = tok.encode("It was the best of times, it was the worst of times. " * 20, bos=True)
    ids, _ = passkey.plant(haystack, tok.encode(passkey.NEEDLE.format(key=key)), length, depth)
    return ids + tok.encode(passkey.QUESTION)


def test_a_model_that_copies_the_key_scores_accuracy_one(tok):
    pairs = passkey.make_keys(1, 40, 9)
    scores = [passkey.ask(CopyReading(tok, probe_text(tok, key)), tok, key, d, 8) for key, d in pairs]
    assert all(s["rank_credit"] == 1.0 and s["rank"] == 1 and s["exact"] for s in scores)


def test_uniform_output_scores_chance_within_its_error(tok):
    K, n = 9, 400
    pairs = passkey.make_keys(2, n, K)
    uniform = [passkey.ask(UniformReading(512), tok, key, d, 8) for key, d in pairs]
    assert all(s["rank_credit"] == pytest.approx(1 / (K + 1)) and not s["exact"] for s in uniform)  # all tie
    rng = random.Random(5)
    noise = [passkey.ask(NoiseReading(rng), tok, key, d, 8)["rank_credit"] for key, d in pairs]
    p = 1 / (K + 1)
    assert abs(sum(noise) / n - p) < 3 * math.sqrt(p * (1 - p) / n)  # binomial standard error


def test_rank_credit_refuses_a_non_finite_score_and_splits_ties():
    with pytest.raises(ValueError, match="not finite"):
        passkey.rank_credit([math.nan, -1.0])
    assert passkey.rank_credit([-1.0, -1.0, -2.0]) == 0.5 and passkey.rank_credit([-2.0, -1.0]) == 0.0


QUICK_METHODS = "base-long,base-short,templora,bpt,uio"


def test_quick_runs_end_to_end_resumes_and_refuses_other_settings(ckpt, books, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--quick", "--model", str(ckpt), "--books-dir", str(books), "--out", str(out), "--threads", "1"]
    assert passkey.main(args + ["--methods", QUICK_METHODS]) == 0
    files = sorted(out.glob("*-L*-d*-k*.json"))
    assert len(files) == 5 * 2 * 2 * 2  # methods x lengths x depths x keys
    assert (out / "passkey.md").stat().st_size > 0
    assert all((out / f"passkey-{m}.png").stat().st_size > 0 for m in QUICK_METHODS.split(","))
    results = {f.stem: json.loads(f.read_text()) for f in files}
    tok = load_tokenizer(ckpt, read_json(ckpt / "config.json"))
    for name, r in results.items():
        ids = tok.encode(r["needle"].format(key=r["key"]))
        assert r["needle_tokens"] == len(ids)
        assert abs(r["needle_at"] - r["depth"] * (r["length"] - len(ids))) <= 0.5
        assert r["key"] not in r["distractors"] and 0 <= r["rank_credit"] <= 1
        assert r["needle_in_window"] == name.startswith("base-long"), name  # W of the others is half the text
    for name, r in results.items():
        if name.startswith("templora"):  # the run's own base model reads through the same window as base-short
            short = results[name.replace("templora", "base-short")]
            base = r["scorers"]["base"]
            assert (base["loglik_key"], base["loglik_distractors"], base["answer"]) == \
                   (short["loglik_key"], short["loglik_distractors"], short["answer"])
            assert r["scorers"]["templora"]["loglik_key"] != base["loglik_key"]  # the adapter did train
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert passkey.main(args + ["--methods", QUICK_METHODS]) == 0  # resumed: nothing redone
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert passkey.main(args + ["--methods", "templora", "--lr", "1e-3"]) == 2
    assert "other settings (config)" in capsys.readouterr().err


def test_dcis_reads_with_its_stretched_window(ckpt, books, tmp_path):
    stretched = tmp_path / "dcis"
    stretched.mkdir()
    config = read_json(ckpt / "config.json") | {"max_position_embeddings": 512,
                                                "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    (stretched / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert passkey.main(["--quick", "--model", str(ckpt), "--books-dir", str(books), "--out", str(out),
                         "--methods", "dcis", "--dcis-config", str(stretched), "--lengths", "230"]) == 0
    r = json.loads(next(out.glob("dcis-*.json")).read_text())
    assert r["window"] == 230 + passkey.MARGIN > 256  # past the tiny model's own 256 positions
    assert r["needle_in_window"] and math.isfinite(r["loglik_key"])


@pytest.mark.parametrize("flag, value, message", [
    ("--methods", "base,uio", "--methods"), ("--depths", "0.5,1.5", "--depths"), ("--keys", "0", "--keys"),
    ("--methods", "supra", "--supra-checkpoint"), ("--lengths", "10,abc", "--lengths"),
    ("--needle", " The pass key is there.", "--needle"), ("--question", " ", "--question")])
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(ckpt, books, tmp_path, capsys, flag, value, message):
    rc = passkey.main(["--quick", "--model", str(ckpt), "--books-dir", str(books), "--out", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_haystack_book_that_methods_train_on_is_refused(ckpt, books, tmp_path, capsys):
    trained = tmp_path / "train"
    trained.mkdir()
    shutil.copy(books / "11.txt", trained / "11.txt")
    args = ["--quick", "--model", str(ckpt), "--books-dir", str(books), "--out", str(tmp_path / "out"),
            "--methods", "base-short", "--train-books-dir", str(trained)]
    assert passkey.main(args) == 2
    err = capsys.readouterr().err
    assert "--books-dir" in err and "11" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_needle_and_question_are_flags_and_results_record_paths_that_travel(ckpt, books, tmp_path):
    out = tmp_path / "out"
    needle, question = " Note: the code is {key}.", " The code is"
    assert passkey.main(["--quick", "--model", str(ckpt), "--books-dir", str(books), "--out", str(out), "--keys", "1",
                         "--methods", "base-long", "--needle", needle, "--question", question, "--depths", "0.5",
                         "--lengths", "150"]) == 0
    r = json.loads(next(out.glob("base-long-*.json")).read_text())
    tok = load_tokenizer(ckpt, read_json(ckpt / "config.json"))
    planted = tok.encode(needle.format(key=r["key"]))
    assert (r["needle"], r["question"], r["needle_tokens"]) == (needle, question, len(planted))
    assert r["question_tokens"] == len(tok.encode(question))
    assert r["model"] == ckpt.name                                 # not the folder of the machine that ran it


def test_a_length_past_the_book_or_the_model_is_an_error_naming_it(ckpt, tmp_path, capsys):
    (tmp_path / "3.txt").write_text("A short book.")
    args = ["--quick", "--model", str(ckpt), "--books-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    assert passkey.main(args + ["--lengths", "150", "--methods", "base-short"]) == 2
    assert "haystack" in capsys.readouterr().err
    assert passkey.main(args + ["--lengths", "240", "--methods", "base-long"]) == 2  # 240 + the question > 256
    assert "--lengths 240" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _ppl_result(path, book, tokens=2048, nll=3.0):
    chunks = [{"start": s, "tokens": 1024, "nll_base": 1024 * nll, "nll_templora": 1024 * (nll - 0.1)}
              for s in range(1, tokens, 1024)]
    path.write_text(json.dumps({"book": book, "scored_tokens": tokens, "chunks": chunks, "command": "test",
                                "timings": {"score_base_s": 1.0, "score_templora_s": 2.0, "train_s": 3.0}}))


def test_compare_shows_each_methods_passkey_accuracy_beside_its_perplexity(tmp_path):
    from bench import compare
    for book in ("1", "2"):
        _ppl_result(tmp_path / f"main-{book}.json", book)
    (tmp_path / "passkey").mkdir()
    credits = {"templora": [(1.0, True), (0.0, False), (0.5, False), (0.0, False)], "base-short": [(0.0, False)]}
    for method, probes in credits.items():
        for i, (credit, exact) in enumerate(probes):
            (tmp_path / "passkey" / f"{method}-L512-d010-k{i}.json").write_text(json.dumps(
                {"method": method, "rank_credit": credit, "rank": 1 if credit == 1 else 3, "exact": exact,
                 "distractors": ["1"] * 9, "needle_in_window": False, "wall_s": 1.0, "blocks_after_needle": 2, "length": 512, "depth": 0.1}))
    assert compare.main(["--results", str(tmp_path)]) == 0
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "compare.md").read_text().splitlines()
            if line.startswith("| ")}
    assert "| 0.38 (1/4) |" in rows["Temp-LoRA, W=2K"] and "| 0.00 (0/1) |" in rows["base, W=2K"]
    assert "key acc" in rows["method"]


def full_forward_loglik(model, text, tokens):
    """log p(tokens | text) from one forward over everything, no cache: the reference for a reading."""
    import torch
    ids = torch.tensor([text + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)  # (T - 1, vocab)
    return sum(logp[len(text) - 1 + j, t].item() for j, t in enumerate(tokens))


@pytest.mark.parametrize("reader", ["window", "state"])
def test_a_reading_that_holds_the_whole_text_scores_a_candidate_as_one_forward_does(reader):
    from helpers import tiny_model
    model = tiny_model(seed=1)
    if reader == "state":
        from methods.supra import linearize
        linearize(model, chunk=16)
    rng = random.Random(0)
    text = [rng.randrange(300) for _ in range(101)]
    settings = {"delta": 24, "window": 160, "keep": 80}
    read = passkey.read_state if reader == "state" else passkey.read_window
    _, readings = read(model, text, 90, settings, n_vocab=300)  # 90 tokens in blocks, the rest pending
    reading = next(iter(readings.values()))
    for cand in ([5, 6, 7], [250, 1]):
        assert reading.loglik(cand) == pytest.approx(full_forward_loglik(model, text, cand), abs=1e-3)
    greedy = reading.greedy(3)
    import torch
    with torch.no_grad():
        assert greedy[0] == model(torch.tensor([text]))[0, -1].argmax().item()
    assert reading.greedy(3) == greedy  # asking leaves the reading as it was


def uio_reading(text, n_context, delta, memories=4):
    from helpers import tiny_model
    model = tiny_model(seed=2)
    settings = {"delta": delta, "uio": {"memories": memories, "rank": 4, "alpha": 8.0, "bos": 1}}
    _, readings, uio = passkey.read_uio(model, text, n_context, settings, n_vocab=300, adapters=None)
    return model, readings["uio"], uio


def test_uio_reading_of_a_text_of_one_block_is_one_forward_of_it():
    rng = random.Random(1)
    text = [rng.randrange(300) for _ in range(40)]
    model, reading, uio = uio_reading(text, 31, delta=30)          # one block: no memory yet
    for cand in ([5, 6, 7], [250, 1]):
        assert reading.loglik(cand) == pytest.approx(full_forward_loglik(model, text, cand), abs=1e-3)
    uio.remove()


def test_uio_reading_answers_after_the_memories_and_decodes_as_it_scores():
    import torch
    rng = random.Random(2)
    text = [rng.randrange(300) for _ in range(101)]
    model, reading, uio = uio_reading(text, 90, delta=24)           # blocks at 1, 25, 49, 73: three memories
    assert reading.reader.memories == 3 and reading.first_visible(3) == 72
    alone = full_forward_loglik(model, text[72:], [5, 6, 7])          # the last segment without its memories
    assert reading.loglik([5, 6, 7]) != pytest.approx(alone, abs=1e-4)
    greedy = reading.greedy(3)
    for j in range(3):                                                 # the cached decode = reading it all again
        hidden, *_ = reading._read(text[72:] + greedy[:j], 0)
        with torch.no_grad():
            assert greedy[j] == model.output(hidden[:, -1])[0, :300].argmax().item()
    assert reading.greedy(3) == greedy                                 # asking leaves the reading as it was
    uio.remove()
