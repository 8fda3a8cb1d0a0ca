"""What templora.py writes survives Ctrl-C, errors and failed writes; what it reports is never NaN."""
import base64
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
import protocol
import templora
from cli import main
from helpers import CKPT_CONFIG, full_disk_after, write_hf_checkpoint
from load_llama import load_llama
from model import KVCache, generate

KNOBS = ["--delta", "32", "--context", "32", "--window", "96", "--keep", "32", "--rank", "4", "--lr", "1e-3", "--quiet"]


def strict_json(path) -> dict:
    """Parse as a strict parser would: NaN, Infinity and -Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}: not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def eval_cli(ckpt, book, out, *argv):
    return main(["eval", "--model", str(ckpt), "--text", str(book), "--out", str(out), *KNOBS, *argv])


def generate_cli(ckpt, book, out, *argv):
    return main(["generate", "--model", str(ckpt), "--prompt-file", str(book), "--out", str(out), *KNOBS, *argv])


def test_an_interrupted_eval_keeps_the_blocks_it_finished_marked_incomplete(ckpt, book, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    seen_on_disk = []
    eval_block = templora.eval_block

    def interrupted_at_block_2(*args):
        if args[2] > 2 * 32:  # start of block 2: blocks 0 and 1 are finished
            seen_on_disk.append(strict_json(out))  # written as it goes: a kill here would keep them too
            raise KeyboardInterrupt
        return eval_block(*args)
    monkeypatch.setattr(templora, "eval_block", interrupted_at_block_2)
    assert eval_cli(ckpt, book, out) == 130
    r = strict_json(out)
    assert r["complete"] is False and r["stopped"] == "interrupted"
    assert [c["start"] for c in r["chunks"]] == [1, 33] and r["scored_tokens"] == 64
    assert r["ppl_base"] == pytest.approx(math.exp(sum(c["nll_base"] for c in r["chunks"]) / 64), rel=1e-12)
    assert seen_on_disk[0]["chunks"] == r["chunks"] and seen_on_disk[0]["complete"] is False
    assert "kept the 2 finished block(s)" in capsys.readouterr().err


def test_a_run_whose_scores_become_non_finite_stops_with_an_error_and_keeps_the_finished_blocks(
        ckpt, book, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert eval_cli(ckpt, book, out, "--lr", "1e30") == 2  # the adapter explodes after block 0's update
    err = capsys.readouterr().err
    assert "error: block 1 (tokens 33..65): nll_templora is not finite" in err
    r = strict_json(out)
    assert r["complete"] is False and len(r["chunks"]) == 1 and "not finite" in r["stopped"]


def test_a_skipped_update_is_null_in_strict_json_and_reported(ckpt, book, tmp_path, capsys):
    out = tmp_path / "r.json"
    # one block: scored before its update, whose second step has a non-finite loss and is skipped
    assert eval_cli(ckpt, book, out, "--lr", "1e30", "--max-tokens", "33") == 0
    r = strict_json(out)
    assert r["complete"] is True and r["skipped_updates"] == 1
    loss = r["chunks"][0]["train_loss"]
    assert math.isfinite(loss[0]) and loss[1] is None
    assert "warning: 1 adapter update(s) skipped" in capsys.readouterr().err


def test_eval_on_a_full_disk_stops_with_one_line_and_keeps_the_previous_result(ckpt, book, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "r.json"
    out.write_text('{"previous": "result"}\n')
    monkeypatch.setattr(protocol, "open", full_disk_after(100), raising=False)
    assert eval_cli(ckpt, book, out) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out}: cannot write (No space left on device); the file there is as it was before" in err
    assert "Traceback" not in err and out.read_text() == '{"previous": "result"}\n'


def test_an_interrupted_generate_keeps_the_text_so_far(ckpt, book, tmp_path, monkeypatch, capsys):
    # reference: 39 tokens, uninterrupted (blocks of 32 and 7; greedy, so a prefix of any longer run)
    assert generate_cli(ckpt, book, tmp_path / "ref.txt", "--max-new-tokens", "39") == 0
    calls, sample = [], model.sample

    def interrupted_at_token_40(*args, **kwargs):
        calls.append(1)
        if len(calls) == 40:  # in the middle of block 1, after block 0's update
            raise KeyboardInterrupt
        return sample(*args, **kwargs)
    monkeypatch.setattr(model, "sample", interrupted_at_token_40)
    out = tmp_path / "gen.txt"
    assert generate_cli(ckpt, book, out, "--max-new-tokens", "64") == 130
    assert out.read_text() == (tmp_path / "ref.txt").read_text()
    assert f"interrupted after 39 tokens: the text so far is in {out}" in capsys.readouterr().err


def test_generate_stops_on_non_finite_logits_and_keeps_the_text_so_far(ckpt, book, tmp_path, capsys):
    out = tmp_path / "gen.txt"
    assert generate_cli(ckpt, book, out, "--max-new-tokens", "40", "--lr", "1e30") == 2
    err = capsys.readouterr().err
    assert "are not finite" in err and "after 32 tokens: the text so far is in" in err  # block 0, before the update
    assert len(out.read_bytes()) > 0


@pytest.fixture(scope="module")
def padded_ckpt(tmp_path_factory):
    """A model with 600 embeddings and a tokenizer of 512 ids, whose padded rows win every argmax."""
    path = tmp_path_factory.mktemp("padded")
    write_hf_checkpoint(path, shard=False, **(CKPT_CONFIG | {"vocab_size": 600}))
    tensors = load_file(path / "model.safetensors")
    head = tensors["lm_head.weight"]
    head[512:] = 20 * head[:88]  # a padded row scores 20x a real one: somewhere one is the largest logit
    head[:512] = 0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return path


def test_generate_never_samples_an_id_the_tokenizer_lacks(padded_ckpt, book, tmp_path):
    net, tok = load_llama(padded_ckpt, dtype=torch.float32)
    cache = KVCache(net.args, 1, 64)
    unmasked = generate(net, cache, tok.encode("It was", bos=True), 0, 8)
    assert max(unmasked) >= tok.n_words == 512  # without the mask this model picks padded ids
    out = tmp_path / "gen.txt"
    assert main(["generate", "--model", str(padded_ckpt), "--prompt-file", str(book), "--out", str(out), "--quiet",
                 "--delta", "32", "--window", "96", "--keep", "32", "--max-new-tokens", "16", "--no-templora"]) == 0
    assert out.read_bytes() == bytes(16)  # every real token scores 0, so greedy takes id 0 (a NUL byte) each time
