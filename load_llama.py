"""Load an official Hugging Face Llama 3.x checkpoint directory (or any Llama-architecture one in the
same layout, such as SmolLM2) into model.py, and its tokenizer into tiktoken.

    model, tokenizer = load_llama("Llama-3.2-1B/")

Only safetensors are read (no pickle is ever loaded). Every problem with the directory raises
CheckpointError with a message that names the file, key or setting at fault.
"""
import base64
import json
import math
import os
import re
from dataclasses import fields, replace
from pathlib import Path

import tiktoken
import torch
from safetensors import SafetensorError, safe_open

from model import ROPE_TYPES, ModelArgs, Transformer, rope_inv_freq


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or uses a feature we do not support."""


# ----------------------------------------------------------------------------- tokenizer

# Llama 3 pre-tokenizer regex (Meta's llama3/tokenizer.py): text is cut into pieces with
# this regex, and each piece is byte-pair-encoded on its own.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# GPT-2's regex, which Hugging Face's ByteLevel pre-tokenizer applies when use_regex=True.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Meta's 256 special tokens, given the ids right after the BPE tokens (128000..128255 for Llama 3).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]
LLAMA3_STOP_TOKENS = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]  # end of text / message / turn


class Tokenizer:
    """Byte-pair encoding done by tiktoken, plus BOS/EOS, special tokens and the id mapping.

    tiktoken calls its ids "ranks" and merges by them; `id_of_rank[rank]` is the model's id
    for that token (identity for Meta's files; -1 for a byte the vocabulary lacks)."""

    def __init__(self, pat_str: str, ranks: dict[bytes, int], id_of_rank: list[int],
                 special_tokens: dict[str, int], bos_id: int | None, stop_ids: list[int],
                 cut_like_meta: bool = False):
        self._bpe = tiktoken.Encoding("templora", pat_str=pat_str, mergeable_ranks=ranks, special_tokens={})
        self._id_of_rank = id_of_rank
        self.cut_like_meta = cut_like_meta  # Meta's files: cut long inputs where Meta's encode() does
        # decode() needs the bytes of every id, special tokens included
        self._bytes_of_id = {id_of_rank[r]: tok for tok, r in ranks.items() if id_of_rank[r] >= 0}
        self._bytes_of_id |= {i: text.encode() for text, i in special_tokens.items()}
        self.special_tokens = special_tokens
        self.n_words = max(self._bytes_of_id) + 1  # vocabulary size
        self.bos_id, self.eos_id, self.stop_ids = bos_id, stop_ids[0], stop_ids
        unknown = [i for i in [bos_id, *stop_ids] if i is not None and i not in self._bytes_of_id]
        if unknown:
            raise ValueError(f"bos/eos token ids {unknown} are not in the vocabulary")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` (e.g. "<|eot_id|>") are encoded as
        ordinary text, as Meta's encode() does by default, so user text cannot forge them.
        (Hugging Face would turn them into their special ids.)"""
        id_of = self._id_of_rank
        chunks = _meta_chunks(text) if self.cut_like_meta else [text]
        ids = [id_of[r] for chunk in chunks for r in self._bpe.encode_ordinary(chunk)]
        ids = [i for i in ids if i >= 0]  # -1: a byte missing from the vocab, dropped as HF does
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids. Bytes that are not valid UTF-8 (e.g. half an emoji) become U+FFFD."""
        try:
            data = b"".join(self._bytes_of_id[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"unknown token id {e.args[0]}") from None
        return data.decode("utf-8", errors="replace")


def _meta_chunks(text: str):
    """Cut `text` exactly where Meta's encode() does, so our ids match Meta's on any input:
    into 400,000-char chunks, then inside any run of more than 25,000 whitespace (or
    non-whitespace) chars every 25,000 chars (Meta's guards against old tiktoken crashes,
    openai/tiktoken#195). The lookbehinds make runs match only from their start: a linear scan.
    Hugging Face does not cut, so this is done for Meta's tokenizer.model only."""
    for start in range(0, len(text), 400_000):
        chunk, cut = text[start:start + 400_000], 0
        for run in re.finditer(r"(?<!\s)\s{25001,}|(?<!\S)\S{25001,}", chunk):
            for end in range(run.start() + 25_000, run.end(), 25_000):
                yield chunk[cut:end]
                cut = end
        yield chunk[cut:]


# What reading a tokenizer file gives: (split regex, tiktoken ranks, id_of_rank, special tokens).
TokenizerParts = tuple[str, dict[bytes, int], list[int], dict[str, int]]


def _read_tiktoken_model(path: Path) -> TokenizerParts:
    """Meta's tokenizer.model: one line "<base64 of the token's bytes> <rank>" per BPE token;
    ranks are the ids, and the 256 special tokens follow them."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a tiktoken BPE file (binary; a SentencePiece model?)") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # wrong field count, bad base64 (binascii.Error), or bad int
                msg = f"{path}, line {n}: expected '<base64> <rank>', got {line[:60]!r}"
                raise CheckpointError(msg) from None
    # checked here: on these tiktoken would panic (a Rust crash, not a Python exception)
    if sorted(ranks.values()) != list(range(len(ranks))) or len({t for t in ranks if len(t) == 1}) < 256:
        raise CheckpointError(f"{path}: ranks must be 0..N-1, each once, and include all 256 single bytes")
    special = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return LLAMA3_PATTERN, ranks, list(range(len(ranks))), special


def _byte_level_table() -> dict[int, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character: printable Latin-1
    bytes stand for themselves, the other 68 bytes become chr(256), chr(257), ... in order.
    Returns a str.translate table back to one char per byte (chars that stand for no byte
    become U+FFFF, which .encode("latin-1") then rejects)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    table = {c: 0xFFFF for c in range(256)} | {b: b for b in printable}
    return table | {256 + i: b for i, b in enumerate(others)}


def _pattern_from_pre_tokenizer(pre: dict | None) -> str | None:
    """One tiktoken regex that cuts text exactly like the file's pre_tokenizer (None: unsupported)."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre or {}]
    kinds, first, last = [s.get("type") for s in steps], steps[0], steps[-1]
    if kinds[-1] == "ByteLevel" and not last.get("add_prefix_space"):
        use_regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and use_regex:  # GPT-2 style
            return GPT2_PATTERN
        if (kinds == ["Split", "ByteLevel"] and not use_regex and "Regex" in first["pattern"]
                and first["behavior"] == "Isolated" and not first["invert"]):  # Llama 3 style
            return first["pattern"]["Regex"]
        if kinds == ["Digits", "ByteLevel"] and use_regex:  # SmolLM2 style
            # Digits are cut out first, then GPT-2's regex runs on the text between them. Same as:
            # GPT-2's regex where a digit never takes a leading space and comes alone (or as a
            # run), and a whitespace run may end right before a digit as at the end of the text.
            digits = r"\p{N}" if first.get("individual_digits") else r"\p{N}+"
            return GPT2_PATTERN.replace(r" ?\p{N}+", digits).replace(r"\s+(?!\S)", r"\s+(?![^\s\p{N}])")
    return None


def _read_hf_tokenizer_json(path: Path) -> TokenizerParts:
    """Hugging Face tokenizer.json holding a byte-level BPE (Llama 3, GPT-2, SmolLM2 style)."""
    def unsupported(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: unsupported {what}")

    tj = read_json(path)
    try:
        model = tj["model"]
        if model.get("type") != "BPE":
            raise unsupported(f"model type {model.get('type')!r} (only byte-level BPE)")
        if tj.get("normalizer"):
            raise unsupported(f"normalizer {tj['normalizer'].get('type')!r}")
        for option in ["dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback"]:
            if model.get(option):
                raise unsupported(f"BPE option {option}={model[option]!r}")
        pat_str = _pattern_from_pre_tokenizer(tj.get("pre_tokenizer"))
        if pat_str is None:
            raise unsupported(f"pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:300]} (supported: "
                              "ByteLevel; Split(Regex)+ByteLevel(use_regex=false); Digits+ByteLevel)")
        special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}

        table = _byte_level_table()
        def to_bytes(token: str) -> bytes:
            try:
                return token.translate(table).encode("latin-1")
            except UnicodeEncodeError:
                raise unsupported(f"vocab entry {token!r} (not a byte-level BPE vocab)") from None

        special_ids = set(special.values())  # special tokens are encoded/decoded apart from the BPE
        bytes_of = {t: to_bytes(t) for t, i in model["vocab"].items() if i not in special_ids}
        vocab = {bytes_of[t]: model["vocab"][t] for t in bytes_of}
        # tiktoken merges the adjacent pair whose *result* has the lowest rank and returns ranks as
        # ids; HF merges the pair listed first in `merges`, and its ids can be in any order (SmolLM2
        # puts special tokens at 0..16). So rank = when a token is first built: the 256 bytes, then
        # each merge's result in list order; id_of_rank maps ranks back to the file's ids.
        ranks = {bytes([b]): b for b in range(256)}
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge  # old / new format
            ranks.setdefault(bytes_of[left] + bytes_of[right], len(ranks))
        orphans = (set(vocab) ^ set(ranks)) - {bytes([b]) for b in range(256)}
        if orphans:
            raise unsupported(f"vocab/merges mismatch at {min(orphans)!r} "
                              "(a token no merge builds, or a merge result missing from the vocab)")
    except (LookupError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None
    # A vocab can lack some bytes (training skips bytes it never saw): they still get a rank so
    # tiktoken never meets an unknown byte, but map to -1 and are dropped, as HF does when the
    # file has no unk_token (SmolLM2 lacks e.g. 0x04 and 0xF1: rare control chars and planes).
    # ignore_merges=True (Llama 3 files: a piece that is a vocab token is emitted whole) is what
    # tiktoken always does; with False, HF's merges reach the same token for trained vocabularies.
    return pat_str, ranks, [vocab.get(tok, -1) for tok in ranks], special


def _ids(*values) -> list[int]:
    """Flatten token-id settings that may be missing (None), an int, or a list of ints."""
    return [i for v in values if v is not None for i in (v if isinstance(v, list) else [v])]


def load_tokenizer(ckpt_dir: Path, config: dict) -> Tokenizer:
    """Load the checkpoint's tokenizer; `config` is its parsed config.json.

    tokenizer.json is preferred: every Hugging Face repo has one and it lists the repo's own
    special tokens. Meta's tokenizer.model is the fallback (Meta's Llama 3 downloads); for
    Llama 3 both give identical ids (checked in tests)."""
    ckpt_dir = Path(ckpt_dir)
    tried = [ckpt_dir / "tokenizer.json", ckpt_dir / "original/tokenizer.model", ckpt_dir / "tokenizer.model"]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"no tokenizer found; tried {', '.join(map(str, tried))}")
    read = _read_hf_tokenizer_json if path.suffix == ".json" else _read_tiktoken_model
    pat_str, ranks, id_of_rank, special = read(path)
    # BOS/EOS come from config.json and generation_config.json (chat models often list several
    # EOS ids there); Llama 3's named stop tokens are always stops too.
    gen_path = ckpt_dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    bos = _ids(config.get("bos_token_id"), gen.get("bos_token_id"), special.get("<|begin_of_text|>"))
    stops = _ids(config.get("eos_token_id"), gen.get("eos_token_id"), *map(special.get, LLAMA3_STOP_TOKENS))
    # eos_id (what encode(eos=True) appends) is the first: config.json's, else <|end_of_text|>
    if not stops:
        raise CheckpointError(f"{ckpt_dir}: no eos_token_id in config.json and no <|end_of_text|> token")
    try:
        return Tokenizer(pat_str, ranks, id_of_rank, special, bos_id=bos[0] if bos else None,
                         stop_ids=list(dict.fromkeys(stops)),  # (no repeats)
                         cut_like_meta=path.suffix != ".json")
    except (ValueError, TypeError) as e:  # a regex tiktoken cannot compile, bos/eos ids not in the vocab
        raise CheckpointError(f"{path}: {e}") from None



# ----------------------------------------------------------------------------- config.json

def args_from_config(config: dict, source: str = "config.json") -> ModelArgs:
    """Map every config.json key we use, by name. A missing key, an unsupported setting, or a value of the
    wrong type or range is an error that names the key and the value."""
    def need(key):
        if key not in config:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return config[key]

    def size(key, default=None) -> int:
        """A positive integer (not 64.0, "64", true or null); `default` when the key is absent or null."""
        value = need(key) if default is None else config.get(key)
        if value is None and default is not None:  # an optional key, absent or null
            value = default
        if type(value) is not int or value < 1:  # type(): True is an int to Python, not to us
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {json.dumps(value)}")
        return value

    def positive_number(key, value) -> float:
        if type(value) not in (int, float) or not 0 < value < math.inf:
            raise CheckpointError(f"{source}: {key} must be a positive finite number, got {json.dumps(value)}")
        return float(value)

    arch = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" or arch != ["LlamaForCausalLM"]:
        raise CheckpointError(f"{source}: unsupported architecture {arch} / model_type "
                              f"{config.get('model_type')!r}; only LlamaForCausalLM is supported")
    for key, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, wanted) != wanted:
            raise CheckpointError(f"{source}: unsupported {key}={config[key]!r} (Llama uses {wanted!r})")

    # Official checkpoints write rope_theta + rope_scaling; transformers >= 5 writes both into rope_parameters.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or need("rope_theta")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type in ROPE_TYPES:
        keys, _, optional = ROPE_TYPES[rope_type]
        if "original_max_position_embeddings" in config and "original_max_position_embeddings" in keys:
            # Phi-3 keeps it beside rope_scaling, not inside: there it wins (as in transformers)
            rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        old_len = rope.get("original_max_position_embeddings")
        if rope_type in ("yarn", "longrope") and rope.get("factor") is None and old_len:
            # transformers' default for these two: the new window over the original one
            rope["factor"] = need("max_position_embeddings") / old_len
        missing = [k for k in keys if k not in rope]
        if missing:
            raise CheckpointError(f"{source}: rope_scaling of type {rope_type!r} lacks {missing}")
        unknown = sorted(set(rope) - set(keys) - set(optional))
        if unknown:  # e.g. partial_rotary_factor: a setting we would otherwise silently ignore
            raise CheckpointError(f"{source}: rope_scaling of type {rope_type!r} has keys we do not support: "
                                  f"{unknown} (known: {', '.join(keys + optional)})")
        rope_scaling = {"rope_type": rope_type, **{k: rope[k] for k in keys + optional if rope.get(k) is not None}}
    else:
        raise CheckpointError(f"{source}: unknown rope_type {rope_type!r} "
                              f"(supported: 'default', {', '.join(map(repr, ROPE_TYPES))})")

    dim, n_heads = size("hidden_size"), size("num_attention_heads")
    n_kv_heads = size("num_key_value_heads", default=n_heads)  # absent: one K/V head per query head
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{source}: num_attention_heads ({n_heads}) must be a multiple of "
                              f"num_key_value_heads ({n_kv_heads}): each K/V head serves a group of query heads")
    if config.get("head_dim") is None and dim < n_heads:
        raise CheckpointError(f"{source}: hidden_size ({dim}) < num_attention_heads ({n_heads}) and no head_dim")
    head_dim = size("head_dim", default=dim // n_heads)
    if head_dim % 2:
        raise CheckpointError(f"{source}: head_dim must be even (RoPE rotates pairs of channels), got {head_dim}")
    tie = config.get("tie_word_embeddings", False)
    if type(tie) is not bool:
        raise CheckpointError(f"{source}: tie_word_embeddings must be true or false, got {json.dumps(tie)}")
    args = ModelArgs(
        dim=dim,
        n_layers=size("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_dim=size("intermediate_size"),
        vocab_size=size("vocab_size"),
        norm_eps=positive_number("rms_norm_eps", need("rms_norm_eps")),
        rope_theta=positive_number("rope_theta", rope_theta),
        rope_scaling=rope_scaling,
        tie_embeddings=tie,
        max_seq_len=size("max_position_embeddings"),
    )
    try:  # the rope type's own checks (lengths of factor lists, positive divisors) on the real sizes
        rope_inv_freq(args)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: rope_scaling of type {rope_type!r}: {e}") from None
    return args


def parameter_count(args: ModelArgs) -> int:
    """How many numbers the model's weights hold, from its settings alone (to refuse an absurd config
    before allocating it)."""
    attention = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)  # wq, wo; wk, wv
    layer = attention + 3 * args.dim * args.hidden_dim + 2 * args.dim                 # + w1 w2 w3, two norms
    embeddings = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2)        # + the head if untied
    return args.n_layers * layer + embeddings + args.dim


def device_memory(device) -> tuple[int, str]:
    """(bytes, what they are) of the memory the weights will live in: the GPU's, else this machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{device} has"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): a ceiling no real model reaches
        return 2**40, "the ceiling is"


# ----------------------------------------------------------------------------- weights

def checkpoint_keys(args: ModelArgs) -> dict[str, str]:
    """The literal table: Hugging Face checkpoint key -> our parameter name."""
    table = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not args.tie_embeddings:
        table["lm_head.weight"] = "output.weight"
    for i in range(args.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        table |= {
            hf + "self_attn.q_proj.weight": ours + "attention.wq.weight",
            hf + "self_attn.k_proj.weight": ours + "attention.wk.weight",
            hf + "self_attn.v_proj.weight": ours + "attention.wv.weight",
            hf + "self_attn.o_proj.weight": ours + "attention.wo.weight",
            hf + "mlp.gate_proj.weight": ours + "feed_forward.w1.weight",
            hf + "mlp.up_proj.weight": ours + "feed_forward.w3.weight",
            hf + "mlp.down_proj.weight": ours + "feed_forward.w2.weight",
            hf + "input_layernorm.weight": ours + "attention_norm.weight",
            hf + "post_attention_layernorm.weight": ours + "ffn_norm.weight",
        }
    return table


def safetensors_files(ckpt: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' table")
        files = [ckpt / name for name in sorted(set(weight_map.values()))]
    elif (ckpt / "model.safetensors").exists():
        files = [ckpt / "model.safetensors"]
    else:
        found = sorted(p.name for p in ckpt.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {found}: pickle files are never loaded, convert them to safetensors)" if found else ""
        raise CheckpointError(f"{ckpt}: no model.safetensors or model.safetensors.index.json{hint}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in model.safetensors.index.json is missing")
    return files


def load_weights(model: Transformer, files: list[Path], dtype: torch.dtype) -> None:
    """Copy every checkpoint tensor into the model, checked by key and shape; all keys must match."""
    table = checkpoint_keys(model.args)
    params = dict(model.named_parameters())  # a tied head appears once, as tok_embeddings.weight
    loaded = set()
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    if key not in table:
                        raise CheckpointError(f"{f}: unexpected tensor {key!r}")
                    if key in loaded:
                        raise CheckpointError(f"{f}: tensor {key!r} appears twice")
                    tensor = st.get_tensor(key)
                    param = params[table[key]]
                    if tensor.shape != param.shape:
                        raise CheckpointError(f"{f}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                              f"expected {tuple(param.shape)} from config.json")
                    if tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                        raise CheckpointError(f"{f}: tensor {key!r} has unsupported dtype {tensor.dtype}")
                    with torch.no_grad():
                        param.copy_(tensor.to(dtype))
                    if not torch.isfinite(param).all():  # checked in `dtype`: a float32 1e38 is inf in float16
                        bad = (~torch.isfinite(param)).sum().item()
                        raise CheckpointError(f"{f}: tensor {key!r} holds {bad} NaN or infinite value(s) "
                                              f"(in {str(dtype).removeprefix('torch.')})")
                    loaded.add(key)
        except SafetensorError as e:  # truncated file, bad header, ...
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{f}: cannot read ({e})") from None
    missing = sorted(set(table) - loaded, key=list(table).index)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{files[0].parent}: missing tensors {shown}")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_model(path, device="cpu", dtype: torch.dtype = torch.bfloat16, changes: dict | None = None) -> Transformer:
    """config.json + safetensors weights -> a frozen Transformer in `dtype` on `device`.

    `changes` replaces ModelArgs fields after config.json is read, for a model that differs from the
    checkpoint in ways its weights do not fix: e.g. {"max_seq_len": 16384, "rope_scaling": {...}} to
    stretch the window. Every weight must still fit the changed shapes."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    args = args_from_config(read_json(ckpt / "config.json"), str(ckpt / "config.json"))
    unknown = set(changes or {}) - {f.name for f in fields(ModelArgs)}
    if unknown:
        raise ValueError(f"changes: {sorted(unknown)} are not ModelArgs fields")
    args = replace(args, **(changes or {}))
    files = safetensors_files(ckpt)
    n, (memory, has) = parameter_count(args), device_memory(device)
    if n * dtype.itemsize > memory:  # refused before allocating: a typo in a size must not take the machine down
        raise CheckpointError(
            f"{ckpt / 'config.json'}: hidden_size={args.dim}, intermediate_size={args.hidden_dim}, "
            f"num_hidden_layers={args.n_layers}, vocab_size={args.vocab_size} make {n:,} parameters, "
            f"{n * dtype.itemsize / 2**30:,.1f} GiB in {str(dtype).removeprefix('torch.')}: more than the "
            f"{memory / 2**30:,.1f} GiB {has}")
    with torch.device("meta"):
        model = Transformer(args).to(dtype)  # shapes and dtypes only: no memory, no random init
    model = model.to_empty(device=device)
    if args.tie_embeddings:  # to_empty gave each module its own new tensor: tie them again
        model.output.weight = model.tok_embeddings.weight
    load_weights(model, files, dtype)
    model.requires_grad_(False)  # the base model is frozen: only adapters ever train
    return model.eval()


def load_llama(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> tuple[Transformer, "Tokenizer"]:
    """Read config.json, the safetensors weights and the tokenizer of a checkpoint directory."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    config_path = ckpt / "config.json"
    config = read_json(config_path)
    tokenizer = load_tokenizer(ckpt, config)  # first: a bad tokenizer fails fast
    vocab_size = args_from_config(config, str(config_path)).vocab_size
    if tokenizer.n_words > vocab_size:  # (a larger model vocabulary is fine: padded embeddings are common)
        raise CheckpointError(f"{config_path}: vocab_size is {vocab_size}, but the tokenizer has ids up to "
                              f"{tokenizer.n_words - 1}: the model has no embedding for them")
    return load_model(ckpt, device, dtype), tokenizer
