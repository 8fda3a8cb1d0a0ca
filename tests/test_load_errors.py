"""Every bad checkpoint gives a CheckpointError whose message names the culprit."""
import base64
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import write_hf_checkpoint
from load_llama import CheckpointError, args_from_config, load_llama, load_model

CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=10000.0,
              tie_word_embeddings=False)


@pytest.fixture
def fresh_ckpt(tmp_path):
    write_hf_checkpoint(tmp_path, shard=False, **CONFIG)
    return tmp_path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint directory not found"):
        load_model(tmp_path / "nowhere")


def test_missing_config(fresh_ckpt):
    (fresh_ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: file not found"):
        load_model(fresh_ckpt)


def test_invalid_config_json(fresh_ckpt):
    (fresh_ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON"):
        load_model(fresh_ckpt)


def test_missing_config_key(fresh_ckpt):
    config = json.loads((fresh_ckpt / "config.json").read_text())
    del config["num_hidden_layers"]
    (fresh_ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing key 'num_hidden_layers'"):
        load_model(fresh_ckpt)


def test_unknown_rope_type(fresh_ckpt):
    # "dynamic" (NTK by sequence length) is left out on purpose: it would re-rotate keys already cached
    edit_config(fresh_ckpt, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(CheckpointError, match="unknown rope_type 'dynamic'"):
        load_model(fresh_ckpt)


def test_official_rope_scaling_key_is_read_too(fresh_ckpt):
    # official Llama 3.1 configs: rope_theta at the top, rope_scaling beside it (not rope_parameters)
    config = json.loads((fresh_ckpt / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (fresh_ckpt / "config.json").write_text(json.dumps(config))
    model = load_model(fresh_ckpt)
    assert model.args.rope_theta == 500000.0 and model.args.rope_scaling["factor"] == 8.0


def test_unsupported_architecture(fresh_ckpt):
    edit_config(fresh_ckpt, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['MistralForCausalLM'\]"):
        load_model(fresh_ckpt)


def test_attention_bias_is_unsupported(fresh_ckpt):
    edit_config(fresh_ckpt, attention_bias=True)
    with pytest.raises(CheckpointError, match="unsupported attention_bias=True"):
        load_model(fresh_ckpt)


def test_missing_tensor(fresh_ckpt):
    edit_weights(fresh_ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors model.layers.1.mlp.up_proj.weight"):
        load_model(fresh_ckpt)


def test_unexpected_tensor(fresh_ckpt):
    edit_weights(fresh_ckpt, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.rotary_emb.inv_freq'"):
        load_model(fresh_ckpt)


def test_misshaped_tensor(fresh_ckpt):
    edit_weights(fresh_ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\), "
                                              r"expected \(16, 32\)"):
        load_model(fresh_ckpt)


def test_truncated_safetensors(fresh_ckpt):
    data = (fresh_ckpt / "model.safetensors").read_bytes()
    (fresh_ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(fresh_ckpt)


def test_corrupt_safetensors_header(fresh_ckpt):
    (fresh_ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(fresh_ckpt)


def test_pickle_checkpoints_are_never_loaded(fresh_ckpt):
    (fresh_ckpt / "model.safetensors").rename(fresh_ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors.*pickle files are never loaded"):
        load_model(fresh_ckpt)


def test_missing_shard(tmp_path):
    write_hf_checkpoint(tmp_path, shard=True, **(CONFIG | {"vocab_size": 4096}))  # big enough for 2+ shards
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in model.safetensors.index.json is missing"):
        load_model(tmp_path)


def test_missing_tokenizer(fresh_ckpt):
    with pytest.raises(CheckpointError, match="no tokenizer found; tried"):
        load_llama(fresh_ckpt)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": "64"}, 'hidden_size must be a positive integer, got "64"'),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer, got 2.5"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be a positive integer, got 2.0"),
    ({"intermediate_size": None}, "intermediate_size must be a positive integer, got null"),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got true"),
    ({"intermediate_size": -64}, "intermediate_size must be a positive integer, got -64"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    ({"num_attention_heads": 64, "num_key_value_heads": 64}, "hidden_size (32) < num_attention_heads (64)"),
    ({"head_dim": 7}, "head_dim must be even (RoPE rotates pairs of channels), got 7"),
    ({"rms_norm_eps": "1e-5"}, 'rms_norm_eps must be a positive finite number, got "1e-5"'),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive finite number, got NaN"),
    ({"rope_theta": -10000.0}, "rope_theta must be a positive finite number, got -10000.0"),
    ({"tie_word_embeddings": "false"}, 'tie_word_embeddings must be true or false, got "false"'),
])
def test_a_config_value_of_the_wrong_type_or_range_is_refused_naming_the_key(changes, message):
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {message}")):
        args_from_config(CONFIG | changes)


def test_optional_config_keys_may_be_absent_or_null():
    args = args_from_config(CONFIG | {"num_key_value_heads": None, "head_dim": None})
    assert (args.n_kv_heads, args.head_dim) == (4, 8)  # one K/V head per query head; hidden_size / heads


def test_a_tokenizer_with_ids_past_vocab_size_is_refused(fresh_ckpt):
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (fresh_ckpt / "tokenizer.model").write_text("\n".join(lines) + "\n")  # 256 bytes + 256 specials > 128
    with pytest.raises(CheckpointError, match="config.json: vocab_size is 128, but the tokenizer has ids up to 511"):
        load_llama(fresh_ckpt)


def test_an_absurd_size_is_refused_before_allocating_naming_the_settings_and_the_size(fresh_ckpt):
    edit_config(fresh_ckpt, vocab_size=100_000_000, hidden_size=65536)  # 13.1e12 parameters
    with pytest.raises(CheckpointError, match=r"config.json: hidden_size=65536, .*vocab_size=100000000 make "
                                              r"13,[0-9,]+ parameters, 2[0-9,.]+ GiB in bfloat16: more than the"):
        load_model(fresh_ckpt)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_naming_the_tensor(fresh_ckpt, value):
    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    edit_weights(fresh_ckpt, poison)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' "
                                              r"holds 1 NaN or infinite value\(s\) \(in float32\)"):
        load_model(fresh_ckpt, dtype=torch.float32)
