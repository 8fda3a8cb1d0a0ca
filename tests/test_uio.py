"""methods/uio.py (UIO-LLMs) as specifications: the encoder's memory and the decoder's memory prefix against
transformers (GQA, head_dim 12, contiguous positions), the fast scoring form against the reading form, and
the training estimators: full BPTT by incremental backward equals one graph's gradient, the reservoir's
reweighted estimate is unbiased, the recent-only one is not. Each equality holds for the four forms of the
two flags (the attention sink, the layer-0 memory): the default (sink, no layer-0 memory), the paper's (no
sink, layer-0 memory) and each fix alone."""
import copy
import random

import pytest
import torch

from helpers import checksums, tiny_model, write_hf_checkpoint
from load_llama import load_model
from methods.uio import (UIO, Reader, UIOConfig, decode, encode, memory_weight, segment_nll, sink_kv,
                         text_gradient, train_step, truncate)
from protocol import evaluate_blocks
from train_block import make_optimizer

# GQA (4 query heads share 2 key/value heads) and a head_dim (12) that is neither 128 nor dim / heads (10)
HF_CONFIG = dict(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, max_position_embeddings=128, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
BOS = 1
# the two flags: sink (a BOS key/value at position 0 ahead of the memories), layer0_memory (the paper's RMSNorm(e))
FORMS = {"default": dict(sink=True, layer0_memory=False, bos=BOS), "paper": dict(sink=False, layer0_memory=True),
         "sink_only": dict(sink=True, layer0_memory=True, bos=BOS),
         "no_layer0_only": dict(sink=False, layer0_memory=False)}


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
def checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("uio_ckpt")
    write_hf_checkpoint(path, shard=False, **HF_CONFIG)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return hf, path


@pytest.fixture(params=list(FORMS))
def pair(request, checkpoint):
    hf, path = checkpoint
    ours = load_model(path, dtype=torch.float32)
    uio = UIO(ours, UIOConfig(segment=7, memories=3, rank=4, alpha=8.0, **FORMS[request.param]))
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
    first = 0 if uio.cfg.layer0_memory else 1  # without the layer-0 memory: layers 1 and 2 only
    assert len(got) == 3 - first
    for layer, (g, e) in enumerate(zip(got, expected[first:]), start=first):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")


def test_the_papers_layer0_memory_is_the_same_for_every_segment_and_the_default_memory_is_not():
    model = small_model()
    segments = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        paper = UIO(model, UIOConfig(segment=6, memories=2, rank=4, alpha=8.0, **FORMS["paper"]))
        randomize(paper, seed=12)
        a, b = encode(model, paper, segments[:1]), encode(model, paper, segments[1:])
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)  # RMSNorm(e): nothing of the segment in it
        torch.testing.assert_close(a[0], model.layers[0].attention_norm(paper.memory[None]), atol=1e-6, rtol=1e-6)
        paper.remove()
        fixed = UIO(model, UIOConfig(segment=6, memories=2, rank=4, alpha=8.0, **FORMS["default"]))
        randomize(fixed, seed=12)
        a, b = encode(model, fixed, segments[:1]), encode(model, fixed, segments[1:])
    assert len(a) == len(model.layers) - 1
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(a, b))  # every memory kept depends on the segment
    assert not any(name.startswith("layers.0.") and ".decoder." in name for name in fixed.tensors())


def hide_columns(module, columns: slice):
    """A forward pre-hook on a transformers attention module that masks the keys in `columns` out of its
    attention (layer 0 of the default form has no memory: its cache here holds placeholders there)."""
    def hook(_, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        if mask.dtype == torch.bool:
            mask[..., columns] = False
        else:
            mask[..., columns] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_decoder_reads_the_memories_as_a_kv_prefix_at_contiguous_positions_like_transformers(pair):
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    hf, ours, uio = pair
    segments = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(3))
    sink, first = int(uio.cfg.sink), 0 if uio.cfg.layer0_memory else 1
    with torch.no_grad():
        memories = [encode(ours, uio, segments[s:s + 1]) for s in range(2)]  # checked against transformers above
        got = ours.output(decode(ours, uio, memories, segments[2:3]))
        # transformers: the base model's K/V of BOS at position 0 (the sink, if on), then the memories' K/V by the
        # decoder's merged k/v_proj and HF's RoPE at positions sink..sink+5, in a DynamicCache; then the base
        # model reads the segment at positions sink+6 ..
        sink_cache = hf(input_ids=torch.tensor([[BOS]]), use_cache=True).past_key_values
        dec, P = merged(hf, uio, "decoder"), 6
        cache = DynamicCache()
        cos, sin = dec.model.rotary_emb(segments.float(), torch.arange(sink, sink + P)[None])
        for layer in range(3):
            if layer < first:  # no memory here: placeholders, masked out of layer 0's attention below
                k = v = torch.randn(1, 2, P, 12)
            else:
                x = torch.cat([m[layer - first] for m in memories], dim=1)                   # (1, P, dim)
                att = dec.model.layers[layer].self_attn
                k = att.k_proj(x).view(1, P, 2, 12).transpose(1, 2)
                v = att.v_proj(x).view(1, P, 2, 12).transpose(1, 2)
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
            if sink:
                k = torch.cat([sink_cache.layers[layer].keys, k], dim=2)
                v = torch.cat([sink_cache.layers[layer].values, v], dim=2)
            cache.update(k, v, layer)
        hooks = [hide_columns(hf.model.layers[0].self_attn, slice(sink, sink + P))] if first else []
        try:
            expected = hf(input_ids=segments[2:3], past_key_values=cache,
                          position_ids=torch.arange(sink + P, sink + P + 7)[None]).logits
        finally:
            for h in hooks:
                h.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_sink_is_the_base_models_bos_key_value_at_position_0_and_stays_there(pair):
    hf, ours, uio = pair
    if not uio.cfg.sink:
        pytest.skip("no sink in this form")
    ids = torch.randint(3, 97, (1 + 3 * 7,), generator=torch.Generator().manual_seed(13)).tolist()
    reader = Reader(ours, uio, ids, 7)
    chunks = evaluate_blocks(ids, 7, reader)["chunks"]
    assert [c["memory_positions"] for c in chunks] == [0, 4, 7]  # the sink at 0, then 3 memory tokens a segment
    expected = hf(input_ids=torch.tensor([[BOS]]), use_cache=True).past_key_values
    for layer in range(3):  # after every memory was written, index 0 of each layer still holds BOS's K/V
        torch.testing.assert_close(reader.cache.k[layer][:, :, :1], expected.layers[layer].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reader.cache.v[layer][:, :, :1], expected.layers[layer].values, atol=1e-5, rtol=1e-5)
    keys, _ = sink_kv(ours, uio)
    torch.testing.assert_close(keys[0], expected.layers[0].keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", [*FORMS, None], ids=[*FORMS, "no_memory"])
def test_scoring_with_one_growing_cache_equals_decoding_each_block_afresh(form):
    # 9 query heads on 3 key/value heads; blocks of 7 with a last one of 4 tokens
    model = tiny_model(dim=36, n_heads=9, n_kv_heads=3, head_dim=8, hidden_dim=64, vocab_size=80).requires_grad_(False)
    memory = form is not None
    uio = UIO(model, UIOConfig(segment=7, memories=3, rank=4, alpha=8.0, **FORMS[form])) if memory else None
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
    sink = int(memory and uio.cfg.sink)
    assert [c["memory_positions"] for c in fast] == ([0, 3 + sink, 6 + sink, 9 + sink] if memory else [0, 0, 0, 0])
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


def small_uio(bptt: str, keep: int = 2, model=None, form: str = "default"):
    model = model or small_model()
    uio = UIO(model, UIOConfig(segment=6, memories=2, rank=4, alpha=8.0, bptt=bptt, keep=keep, **FORMS[form]))
    randomize(uio, seed=6)
    ids = torch.randint(0, 50, (1, 6 * 6 + 1), generator=torch.Generator().manual_seed(7))  # 6 segments
    return model, uio, ids


def gradient(model, uio, ids, seed: int = 0) -> torch.Tensor:
    for p in uio.parameters():
        p.grad = None
    text_gradient(model, uio, ids, random.Random(seed))
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in uio.parameters()])


@pytest.mark.parametrize("form", list(FORMS))
def test_full_bptt_by_incremental_backward_equals_the_gradient_of_one_graph(form):
    model, uio, ids = small_uio("full", form=form)
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


@pytest.mark.parametrize("form", ["default", "paper"])
def test_a_reservoir_with_room_for_every_segment_is_full_bptt(form):
    model, uio, ids = small_uio("full", form=form)
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


@pytest.mark.parametrize("form", ["default", "paper"])
def test_reservoir_gradient_is_unbiased_and_recent_only_is_not(monkeypatch, form):
    """The mean of 64 reservoir estimates converges to the full-BPTT gradient: its error is within 3 standard
    errors (measured). The recent-only estimate has no randomness and misses every path longer than k segments:
    its error is more than 3x that tolerance. So is the reservoir's without the 1/p_t weights (the official's)."""
    model, uio, ids = small_uio("full", form=form)
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


def test_a_batch_with_an_answer_mask_is_the_token_weighted_mean_of_its_texts_gradients():
    """text_gradient on B texts with the loss on some targets only (the synthetic recall task's answer): the
    gradient of the mean over the masked targets of the batch, i.e. each text's own gradient weighted by its
    share of the masked targets."""
    model, uio, _ = small_uio("full")
    ids = torch.randint(0, 50, (2, 4 * 6 + 1), generator=torch.Generator().manual_seed(14))
    answer = torch.zeros(2, 24, dtype=torch.bool)
    answer[0, [20, 23]] = True  # text 0: two answer targets in segment 3
    answer[1, [9, 22]] = True   # text 1: one in segment 1, one in segment 3
    answer[1, 15] = True        # and one in segment 2
    parts = []
    for b in range(2):
        for p in uio.parameters():
            p.grad = None
        text_gradient(model, uio, ids[b:b + 1], random.Random(0), answer[b:b + 1])
        parts.append(torch.cat([p.grad.flatten() for p in uio.parameters()]))
    for p in uio.parameters():
        p.grad = None
    text_gradient(model, uio, ids, random.Random(0), answer)
    both = torch.cat([p.grad.flatten() for p in uio.parameters()])
    torch.testing.assert_close(both, (2 * parts[0] + 3 * parts[1]) / 5, atol=1e-7, rtol=1e-5)
