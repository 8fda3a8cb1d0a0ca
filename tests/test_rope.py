"""The stretched RoPE types beyond their logits (those are in test_model.py): longrope's one factor set per
model, the loader's checks, and NTK as a change of base."""
import pytest
import torch

from helpers import write_hf_checkpoint
from load_llama import CheckpointError, args_from_config, load_model
from model import KVCache, ModelArgs, rope_inv_freq

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
LONG = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]    # 8 pairs of head_dim 16
SHORT = [1.0, 1.0, 1.0, 1.1, 1.2, 1.2, 1.3, 1.4]


def longrope(max_len: int, old_len: int = 16) -> dict:
    return dict(max_position_embeddings=max_len, rope_scaling={"rope_type": "longrope", "long_factor": LONG,
                                                               "short_factor": SHORT,
                                                               "original_max_position_embeddings": old_len})


def test_longrope_keeps_one_factor_set_so_a_cache_filled_before_the_original_length_stays_valid(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_checkpoint(tmp_path, shard=False, **BASE, **longrope(max_len=128))
    ours = load_model(tmp_path, dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.randint(0, BASE["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # ours: 10 tokens (inside the original 16) into the cache, then 30 more past it = one forward of 40
        cache = KVCache(ours.args, 1, 40)
        cached = torch.cat([ours(tokens[:, :10], 0, cache), ours(tokens[:, 10:], 10, cache)], dim=1)
        full = ours(tokens)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        # and the one forward is transformers' (which uses long_factor once the sequence is past 16)
        torch.testing.assert_close(full, hf(tokens).logits, atol=1e-4, rtol=1e-4)
        # the hazard this rule avoids: transformers rotates the first 10 cached keys with short_factor, the
        # later queries with long_factor, so its cached run is not its own one-forward run
        first = hf(tokens[:, :10], use_cache=True)
        rest = hf(tokens[:, 10:], past_key_values=first.past_key_values).logits
        assert (rest - hf(tokens).logits[:, 10:]).abs().max() > 1e-2


def test_longrope_not_stretched_uses_short_factor_like_transformers_within_the_original_length(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_checkpoint(tmp_path, shard=False, **BASE, **longrope(max_len=16))  # factor 16 / 16 = 1
    ours = load_model(tmp_path, dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    tokens = torch.randint(0, BASE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)
    assert ours.args.rope_scaling["factor"] == 1.0


CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)


def test_phi3_longrope_config_gets_transformers_defaults():
    # Phi-3 style: "type", original_max_position_embeddings beside rope_scaling, no factor, no attention_factor
    args = args_from_config(CONFIG | {"original_max_position_embeddings": 64,
                                      "rope_scaling": {"type": "longrope", "long_factor": LONG, "short_factor": SHORT}})
    assert args.rope_scaling["factor"] == 512 / 64 and args.rope_scaling["original_max_position_embeddings"] == 64
    _, attention_factor = rope_inv_freq(args)
    assert attention_factor == pytest.approx((1 + torch.tensor(8.0).log() / torch.tensor(64.0).log()).sqrt().item())


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "long_factor": [2.0] * 3, "short_factor": SHORT, "factor": 4.0,
      "original_max_position_embeddings": 64}, "long_factor has 3 entries, expected head_dim/2 = 8"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
     r"keys we do not support: \['partial_rotary_factor'\]"),
    ({"rope_type": "linear", "factor": 0.0}, "not positive and finite"),
    ({"rope_type": "longrope", "long_factor": [1.0] * 7 + [-1.0], "short_factor": SHORT, "factor": 4.0,
      "original_max_position_embeddings": 64}, "not positive and finite"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 64},
     r"lacks \['high_freq_factor'\]"),
])
def test_loader_refuses_rope_settings_it_cannot_honour(scaling, message):
    with pytest.raises(CheckpointError, match=message):
        args_from_config(CONFIG | {"rope_scaling": scaling})


def test_ntk_base_change_divides_pair_i_by_s_to_the_2i_over_d_minus_2():
    from methods.dcis import ntk_theta, start_factors
    args = ModelArgs(head_dim=16, rope_theta=10000.0)
    plain, _ = rope_inv_freq(args)
    ntk, _ = rope_inv_freq(ModelArgs(head_dim=16, rope_theta=ntk_theta(10000.0, 4.0, 16)))
    # the official DCIS code's 'ntk' start, an independent form: λ_i = s^(2i / (d - 2))
    expected = 4.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 14)
    torch.testing.assert_close((plain / ntk).double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(start_factors("ntk", args, 4.0, 64), dtype=torch.float64), expected)
