"""Load an official Hugging Face Llama 3.x checkpoint directory (or any Llama-architecture one in the
same layout, such as SmolLM2) into model.py, and its tokenizer into tiktoken.

    model, tokenizer = load_llama("Llama-3.2-1B/")

Only safetensors are read (no pickle is ever loaded). Every problem with the directory raises
CheckpointError with a message that names the file, key or setting at fault.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model import ModelArgs, Transformer

# @@TOKENIZER@@
class CheckpointError(ValueError):
    pass



# ----------------------------------------------------------------------------- config.json

def args_from_config(config: dict, source: str = "config.json") -> ModelArgs:
    """Map every config.json key we use, by name. A missing key or an unsupported setting is an error."""
    def need(key):
        if key not in config:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return config[key]

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
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rope]
        if missing:
            raise CheckpointError(f"{source}: rope_scaling of type 'llama3' lacks {missing}")
        rope_scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
    else:
        raise CheckpointError(f"{source}: unknown rope_type {rope_type!r} (supported: 'default', 'llama3')")

    n_heads = need("num_attention_heads")
    return ModelArgs(
        dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or need("hidden_size") // n_heads,
        hidden_dim=need("intermediate_size"),
        vocab_size=need("vocab_size"),
        norm_eps=need("rms_norm_eps"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_seq_len=need("max_position_embeddings"),
    )


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


def load_model(path, device="cpu", dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """config.json + safetensors weights -> a frozen Transformer in `dtype` on `device`."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    args = args_from_config(read_json(ckpt / "config.json"), str(ckpt / "config.json"))
    files = safetensors_files(ckpt)
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
    tokenizer = load_tokenizer(ckpt, read_json(ckpt / "config.json"))  # first: a bad tokenizer fails fast
    return load_model(ckpt, device, dtype), tokenizer
