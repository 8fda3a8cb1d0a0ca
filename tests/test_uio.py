"""methods/uio.py (UIO-LLMs) as specifications: the encoder's memory and the decoder's memory prefix against
transformers (GQA, head_dim 12, contiguous positions), the fast scoring form against the reading form, and
the training estimators: full BPTT by incremental backward equals one graph's gradient, the reservoir's
reweighted estimate is unbiased, the recent-only one is not."""
import copy
import random

import pytest
import torch

from helpers import checksums, tiny_model, write_hf_checkpoint
from load_llama import load_model
from methods.uio import (UIO, Reader, UIOConfig, decode, encode, memory_weight, segment_nll, text_gradient,
                         train_step, truncate)
from protocol import evaluate_blocks
from train_block import make_optimizer

# GQA (4 query heads share 2 key/value heads) and a head_dim (12) that is neither 128 nor dim / heads (10)
HF_CONFIG = dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, max_position_embeddings=128, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def randomize(uio: UIO, seed: int, scale: float = 0.1) -> None:
    """Noise on every trained tensor: B != 0, so that both LoRAs really change what they wrap."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in uio.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def merged(hf, uio: UIO, role: str):
    """A copy of the transformers model with `role`'s LoRA merged into q/k/v_proj: W + (α/r) B A."""
    m = copy.deepcopy(hf)
    with torch.no_grad():
        for (i, name), switch in uio.switches.items():
            lora = getattr(switch, role)
            if lora is not None:
                proj = getattr(m.model.layers[i].self_attn, {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj"}[name])
                proj.weight += lora.scale * lora.lora_b @ lora.lora_a
    return m


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("uio_ckpt")
    write_hf_checkpoint(path, shard=False, **HF_CONFIG)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ours = load_model(path, dtype=torch.float32)
    uio = UIO(ours, UIOConfig(segment=7, memories=3, rank=4, alpha=8.0))
    randomize(uio, seed=1)
    return hf, ours, uio


def test_encoder_memory_is_each_layers_normed_attention_input_at_the_memory_tokens(pair):
    hf, ours, uio = pair
    segment = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    enc = merged(hf, uio, "encoder")
    embeds = torch.cat([enc.model.embed_tokens(segment), uio.memory[None]], dim=1)  # the segment, then e
    with torch.no_grad():
        states = enc.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states  # [l]: input of layer l
        expected = [enc.model.layers[l].input_layernorm(states[l])[:, -3:] for l in range(3)]
        got = encode(ours, uio, segment)
    assert len(got) == 3
    for layer, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")


def test_decoder_reads_the_memories_as_a_kv_prefix_at_contiguous_positions_like_transformers(pair):
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    hf, ours, uio = pair
    segments = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        memories = [encode(ours, uio, segments[s:s + 1]) for s in range(2)]  # checked against transformers above
        got = ours.output(decode(ours, uio, memories, segments[2:3]))
        # transformers: the memories' K/V by the decoder's merged k/v_proj and HF's RoPE at positions 0..5, in a
        # DynamicCache; then the base model reads the segment at positions 6..12
        dec, P = merged(hf, uio, "decoder"), 6
        cache = DynamicCache()
        cos, sin = dec.model.rotary_emb(segments.float(), torch.arange(P)[None])
        for layer in range(3):
            x = torch.cat([m[layer] for m in memories], dim=1)                               # (1, P, dim)
            att = dec.model.layers[layer].self_attn
            k = att.k_proj(x).view(1, P, 2, 12).transpose(1, 2)
            v = att.v_proj(x).view(1, P, 2, 12).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            cache.update(k, v, layer)
        expected = hf(input_ids=segments[2:3], past_key_values=cache, position_ids=torch.arange(P, P + 7)[None]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", [True, False], ids=["uio", "no_memory"])
def test_scoring_with_one_growing_cache_equals_decoding_each_block_afresh(memory):
    # 9 query heads on 3 key/value heads; blocks of 7 with a last one of 4 tokens
    model = tiny_model(dim=36, n_heads=9, n_kv_heads=3, head_dim=8, hidden_dim=64, vocab_size=80).requires_grad_(False)
    uio = UIO(model, UIOConfig(segment=7, memories=3, rank=4, alpha=8.0)) if memory else None
    if uio:
        randomize(uio, seed=4)
    ids = torch.randint(0, 80, (1 + 3 * 7 + 4,), generator=torch.Generator().manual_seed(5)).tolist()
    fast = evaluate_blocks(ids, 7, Reader(model, uio, ids, 7))["chunks"]
    text = torch.tensor([ids])
    with torch.no_grad():
        memories, slow = [], []
        for start in range(1, len(ids), 7):
            segment = text[:, start - 1:min(start + 6, len(ids) - 1)]
            slow.append(segment_nll(model, decode(model, uio, memories, segment), text[:, start:start + 7]).item())
            if uio:
                memories.append(encode(model, uio, segment))
            else:  # no memory: the base model on the segment alone
                logits = model(segment)
                assert slow[-1] == pytest.approx(torch.nn.functional.cross_entropy(
                    logits[0], text[0, start:start + 7], reduction="sum").item(), rel=1e-5)
    assert [c["memory_positions"] for c in fast] == ([0, 3, 6, 9] if memory else [0, 0, 0, 0])
    assert [c["nll_uio"] for c in fast] == pytest.approx(slow, rel=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: on a busy 2-core machine a second thread only adds waiting (measured: 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model():
    return tiny_model(dim=32, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=48, vocab_size=50).requires_grad_(False)


def small_uio(bptt: str, keep: int = 2, model=None):
    model = model or small_model()
    uio = UIO(model, UIOConfig(segment=6, memories=2, rank=4, alpha=8.0, bptt=bptt, keep=keep))
    randomize(uio, seed=6)
    ids = torch.randint(0, 50, (1, 6 * 6 + 1), generator=torch.Generator().manual_seed(7))  # 6 segments
    return model, uio, ids


def gradient(model, uio, ids, seed: int = 0) -> torch.Tensor:
    for p in uio.parameters():
        p.grad = None
    text_gradient(model, uio, ids, random.Random(seed))
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in uio.parameters()])


def test_full_bptt_by_incremental_backward_equals_the_gradient_of_one_graph():
    model, uio, ids = small_uio("full")
    got = gradient(model, uio, ids)
    # the reference: every segment's loss in one graph, the memories never detached, one backward
    total, memories = 0.0, []
    for t in range(6):
        segment = ids[:, 6 * t:6 * t + 6]
        total = total + segment_nll(model, decode(model, uio, memories, segment), ids[:, 6 * t + 1:6 * t + 7]) / 36
        memories.append(encode(model, uio, segment))
    for p in uio.parameters():
        p.grad = None
    total.backward()
    expected = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in uio.parameters()])
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_reservoir_with_room_for_every_segment_is_full_bptt():
    model, uio, ids = small_uio("full")
    full = gradient(model, uio, ids)
    uio.cfg.bptt, uio.cfg.keep = "reservoir", 5  # 5 memories are ever made: all stay live, every weight is 1
    torch.testing.assert_close(gradient(model, uio, ids, seed=3), full, atol=1e-6, rtol=1e-5)


def test_the_reservoir_keeps_each_earlier_segment_with_probability_k_over_t():
    k, steps, runs = 2, 9, 20000
    rng = random.Random(0)
    counts = [[0] * steps for _ in range(steps)]  # counts[t][s]: s live when segment t is read
    for _ in range(runs):
        live = []
        for t in range(steps):
            for s in live:
                counts[t][s] += 1
            truncate("reservoir", live, t, k, rng)
    for t in range(1, steps):
        p = 1 / memory_weight("reservoir", t, k)
        for s in range(t):  # binomial: 4.5 standard deviations of 20000 draws
            assert abs(counts[t][s] / runs - p) < 4.5 * (p * (1 - p) / runs) ** 0.5 + 1e-9, (t, s)


def mean_and_tolerance(model, uio, ids, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of n reservoir estimates and 3 standard errors of it: 3 sqrt(trace of their covariance / n)."""
    samples = torch.stack([gradient(model, uio, ids, seed=s) for s in range(n)])
    assert samples.var(0).sum() > 0  # a random estimate
    return samples.mean(0), 3 * (samples.var(0).sum() / n).sqrt()


def test_reservoir_gradient_is_unbiased_and_recent_only_is_not(monkeypatch):
    """The mean of 64 reservoir estimates converges to the full-BPTT gradient: its error is within 3 standard
    errors (measured). The recent-only estimate has no randomness and misses every path longer than k segments:
    its error is more than 3x that tolerance. So is the reservoir's without the 1/p_t weights (the official's)."""
    model, uio, ids = small_uio("full")
    exact = gradient(model, uio, ids)
    uio.cfg.bptt = "recent"
    recent = gradient(model, uio, ids)
    uio.cfg.bptt = "reservoir"
    mean, tolerance = mean_and_tolerance(model, uio, ids, 64)
    assert tolerance < 0.2 * exact.norm()  # 64 samples are enough for the test to mean something
    assert (mean - exact).norm() < tolerance
    assert (recent - exact).norm() > 3 * tolerance
    monkeypatch.setattr("methods.uio.memory_weight", lambda bptt, t, k: 1.0)
    unweighted, tolerance = mean_and_tolerance(model, uio, ids, 32)
    assert (unweighted - exact).norm() > 3 * tolerance


def test_training_changes_only_the_uio_tensors_and_removal_restores_the_base_model():
    model = small_model()
    before = checksums(model)
    model, uio, ids = small_uio("reservoir", model=model)
    with torch.no_grad():
        uio.use("base")
        logits = model(ids)
    trained = {k: v.detach().clone() for k, v in uio.tensors().items()}
    optimizer = make_optimizer(uio.parameters(), 1e-2, 0.1, (0.9, 0.95), eps=1e-8)
    loss, norm = train_step(model, uio, optimizer, ids, random.Random(0))
    assert loss > 0 and norm > 0
    assert all(not torch.equal(trained[k], v) for k, v in uio.tensors().items() if k.endswith(("lora_b", "memory")))
    uio.remove()
    assert checksums(model) == before
    assert torch.equal(model(ids), logits)
