"""Helpers the tests import: tiny random models, checkpoints written by transformers in the official
layout, checksums. (Fixtures live in conftest.py.)"""
import base64
import errno
import hashlib

import pytest
import torch

from model import ModelArgs, Transformer

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=300,
            norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256)

# the checkpoint of the `ckpt` fixture (Hugging Face config.json names)
CKPT_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                   bos_token_id=256, eos_token_id=257)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A small random float32 model of our own (no checkpoint), for tests of mechanics."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**(TINY | overrides)))
    with torch.no_grad():  # nn.Linear's default init gives near-uniform logits; widen them a little
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return model.eval()


def write_hf_checkpoint(path, seed: int = 0, shard: bool = True, **config):
    """Save a random transformers LlamaForCausalLM with `config` to `path` in bf16 (sharded when
    asked), exactly as an official checkpoint is laid out. Every weight, norms included, is random."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**config)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    hf.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB" if shard else "10GB")
    return hf


def write_byte_tokenizer(path) -> None:
    """tokenizer.model in Meta's format with one token per byte (ids 0..255; the 256 specials follow)."""
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (path / "tokenizer.model").write_text("\n".join(lines) + "\n")


def checksums(model) -> dict[str, str]:
    """sha256 of every tensor's bytes: equal checksums mean bit-identical weights."""
    return {n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.state_dict().items()}


def full_disk_after(n_chars: int):
    """A stand-in for open() whose files take n_chars, then fail as a full disk does (monkeypatch it in as
    protocol.open to break a write midway)."""
    class FullDisk:
        def __init__(self, path, mode, encoding):
            self.f = open(path, mode, encoding=encoding)

        def write(self, text):
            self.f.write(text[:n_chars])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    return FullDisk
