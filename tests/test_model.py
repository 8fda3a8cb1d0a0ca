"""model.py + load_llama.py against the official implementation (transformers), and the KV cache."""

import pytest
import torch

from load_llama import load_model
from helpers import tiny_model, write_hf_checkpoint

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, rms_norm_eps=1e-5,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "gqa_untied": dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
    "mha_tied_wide_heads": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32, rope_theta=500000.0,
                                tie_word_embeddings=True),
    "mqa_llama3_scaling": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=False,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # the stretched RoPEs of methods/dcis.py's comparison, past original_max_position_embeddings (64)
    "pi_linear": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "yarn": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                 rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64}),
    "yarn_mscale_untruncated": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=500.0,
                                    rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 4, "beta_slow": 2,
                                                  "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False,
                                                  "original_max_position_embeddings": 64}),
    # without `factor`: both take max_position_embeddings / original (8) for the attention factor
    "longrope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                     rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 64,
                                   "long_factor": [1.0, 1.3, 1.9, 2.4, 3.1, 5.5, 7.0, 9.0],
                                   "short_factor": [1.0, 1.0, 1.1, 1.1, 1.2, 1.3, 1.3, 1.5]}),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    write_hf_checkpoint(tmp_path, **BASE, **CONFIGS[name])
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # really sharded, with an index
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ours = load_model(tmp_path, dtype=torch.float32)

    # 300 positions: well past original_max_position_embeddings (64), where the scaling matters (and where
    # transformers' longrope uses long_factor, as ours always does for a stretched config)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_tied_checkpoint_has_no_lm_head_and_shares_one_tensor(tmp_path):
    write_hf_checkpoint(tmp_path, shard=False, **BASE, **CONFIGS["mha_tied_wide_heads"])
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight


def test_loaded_weights_keep_the_files_dtype_values(tmp_path):
    # bf16 on disk -> bf16 in memory must be an exact copy
    from safetensors.torch import load_file
    write_hf_checkpoint(tmp_path, shard=False, **BASE, **CONFIGS["gqa_untied"])
    model = load_model(tmp_path, dtype=torch.bfloat16)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert torch.equal(model.layers[1].attention.wk.weight, on_disk["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(model.output.weight, on_disk["lm_head.weight"])
    assert not any(p.requires_grad for p in model.parameters())


def _cached_logits(model, tokens, chunks):
    from model import KVCache
    cache = KVCache(model.args, tokens.shape[0], tokens.shape[1])
    out, pos = [], 0
    for n in chunks:
        out.append(model(tokens[:, pos:pos + n], pos, cache))
        pos += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[24] + [1] * 16, [5, 1, 13, 2, 9, 1, 9]], ids=["prefill_then_single", "uneven"])
def test_cached_decoding_matches_full_forward(chunks):
    model = tiny_model(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    tokens = torch.randint(0, 300, (2, sum(chunks)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        cached = _cached_logits(model, tokens, chunks)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_last_n_logits_equal_the_tail_of_all_logits():
    model = tiny_model()
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last=7), model(tokens)[:, -7:])


def test_generate_greedy_equals_argmax_of_full_forward():
    from model import KVCache, generate
    model = tiny_model()
    prompt = [3, 14, 15, 92, 65]
    cache = KVCache(model.args, 1, 64)
    new = generate(model, cache, prompt, 0, max_new_tokens=12)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):  # reference: no cache, recompute everything for each token
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt):]


def test_generate_stops_at_a_stop_token():
    from model import KVCache, generate
    model = tiny_model()
    full = generate(model, KVCache(model.args, 1, 64), [1, 2, 3], 0, max_new_tokens=10)
    stop = full[4]
    cut = generate(model, KVCache(model.args, 1, 64), [1, 2, 3], 0, max_new_tokens=10, stop_ids=(stop,))
    assert cut == full[:full.index(stop) + 1]


def test_top_p_sampling_is_seeded_and_stays_in_the_nucleus():
    from model import sample
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0, -2.0])  # probs ~ 0.72, 0.26, then tiny
    draws = [sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1}
    again = [sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


def test_hidden_states_and_input_embeddings_match_transformers(tmp_path):
    """The seam for methods: embeddings in (memory tokens), the final normed hidden states out."""
    transformers = pytest.importorskip("transformers")
    write_hf_checkpoint(tmp_path, shard=False, **BASE, **CONFIGS["gqa_untied"])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ours = load_model(tmp_path, dtype=torch.float32)
    embeds = torch.randn(2, 37, BASE["hidden_size"], generator=torch.Generator().manual_seed(2))  # not token rows
    with torch.no_grad():
        expected = hf.model(inputs_embeds=embeds).last_hidden_state  # after the final norm, like ours
        got = ours.hidden_states(embeds)
        tokens = torch.randint(0, BASE["vocab_size"], (1, 20))
        logits_via_seam = ours.output(ours.hidden_states(ours.tok_embeddings(tokens)))
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(logits_via_seam, ours(tokens))


def test_every_rope_type_in_the_table_is_accepted_by_the_loader_with_its_keys():
    from load_llama import args_from_config
    from model import ROPE_TYPES
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=100, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)
    pairs = 64 // 4 // 2
    values = {"long_factor": [2.0] * pairs, "short_factor": [1.5] * pairs, "truncate": False}  # lists, a bool
    for kind, rope in ROPE_TYPES.items():
        scaling = {"rope_type": kind, **{k: values.get(k, 2.0) for k in rope.keys + rope.optional}}
        args = args_from_config(config | {"rope_scaling": scaling})
        assert args.rope_scaling == scaling


def test_loading_into_changed_args_keeps_the_weights_and_refuses_what_does_not_fit(tmp_path):
    from load_llama import CheckpointError
    write_hf_checkpoint(tmp_path, shard=False, **BASE, **CONFIGS["gqa_untied"])
    plain = load_model(tmp_path, dtype=torch.float32)
    longer = load_model(tmp_path, dtype=torch.float32, changes={"max_seq_len": 4096})
    assert longer.args.max_seq_len == 4096 and plain.args.max_seq_len == BASE["max_position_embeddings"]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), longer.parameters()))
    with pytest.raises(ValueError, match=r"\['max_len'\] are not ModelArgs fields"):
        load_model(tmp_path, changes={"max_len": 4096})
    with pytest.raises(CheckpointError, match="expected .* from config.json"):  # shapes must still fit
        load_model(tmp_path, changes={"hidden_dim": 96})
