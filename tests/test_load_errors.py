"""Every bad checkpoint gives a CheckpointError whose message names the culprit."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import write_hf_checkpoint
from load_llama import CheckpointError, load_llama, load_model

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
