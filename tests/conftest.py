"""Fixtures shared by several test files: a tiny checkpoint with a byte-level Meta tokenizer and a short
text, for the CLI and the benchmarks. (Importable helpers live in helpers.py.)"""
import pytest

from helpers import CKPT_CONFIG, write_byte_tokenizer, write_hf_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A random Llama whose tokenizer is Meta's format with one token per byte (+ 256 specials = 512)."""
    path = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(path, shard=False, **CKPT_CONFIG)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def book(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text("It was the best of times, it was the worst of times. " * 4)  # 212 bytes
    return path
