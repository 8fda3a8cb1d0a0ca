"""Passkey retrieval beside perplexity: does a method still hold a fact it read outside its window?

    python -m bench.passkey --methods base-long,base-short,templora --lengths 512,1024,2048 --threads 2
    python -m bench.passkey --quick --model CKPT --books-dir DIR --out DIR          # seconds, a tiny checkpoint

The probe (Mohtashami & Jaggi 2023, "Landmark Attention"): a haystack of PG19 text from the evaluation books
(never a book any method trains on: one found in --train-books-dir is refused), the needle (--needle) "The
pass key is K. Remember it. K is the pass key." with a random 5-digit key K at a depth measured in tokens, and
(--question) "What is the pass key? The pass key is" at the end.

    ids = [ BOS haystack ... | needle | ... haystack ]  [ question ]  [ " K" ]
          |<-- depth x (length - needle) -->|
          |<-------------- length --------------->|

The haystack and needle (`length` tokens) are read under the block protocol (protocol.evaluate_blocks, blocks
of Δ), exactly as perplexity is: Temp-LoRA scores each block and trains its adapter on it (eval_block, as in
templora.evaluate). After the last block the question is read by what the method kept (its window, its
adapter, its state) and two scores are taken:
    exact     greedy decoding after the question; its first run of digits equals K
    rank      the log-likelihood of " K" against that of K distractor keys (never equal to K); credit 1 when
              the true key scores highest (1/n when n candidates tie at the top), so chance is 1/(K+1)
Keys and distractors come from a local random.Random(--seed): key i is the same in every cell of the grid.

Methods, each in its natural form (--methods):
    base-long    the base model, a window that holds the whole text (the needle in it)
    base-short   the base model, the sliding window W of Temp-LoRA's knobs (the needle outside it)
    templora     Temp-LoRA with W: the paper's question, the needle only in the adapter's weights
    bpt          Temp-LoRA with a long L_T (the whole text before each block) computed blockwise (BPT)
    dcis         the DCIS-stretched model (--dcis-config: the searched RoPE factors) with its stretched window
    uio          UIO-LLMs' memory (methods/uio.py, the fixed form: a sink, no layer-0 memory): every block before
                 the last compressed into M = Δ / --uio-compression memory tokens, the last one and the question
                 read after them; untrained (the encoder is the base model, e the BOS embedding) unless
                 --uio-adapters gives a trained UIO's tensors (bench.uio writes uio.safetensors)
    supra        the SUPRA-linearised model (--supra-checkpoint, made by bench.supra) with its recurrent state
    lolcats      the LoLCATs-linearised model (--lolcats-checkpoint, made by bench.lolcats) with its state: S, z
                 and the last 63 keys and values of its softmax window
Temp-LoRA's knobs are the replication's (bench/common.py: Δ=1024, L_T=512, W=2048, L_x=1024 at 4K tokens)
scaled by length / --knobs-at: at the default 4096, Δ = length/4 and W = length/2, so the window that reads the
question never holds a needle at depth <= 0.7 (each result records whether it did: `needle_in_window`).

One JSON per (method, length, depth, key) in --out (default bench/results/passkey), written atomically as it
completes; a rerun skips what is done and refuses a result made with other settings. Then passkey.md (the
tables) and passkey-<method>.png (length x depth, colour = rank accuracy) are rewritten from all the results.
"""
import argparse
import copy
import hashlib
import math
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from bench.common import (EVAL_BOOKS, MODEL_DIR, REPLICATION, RESULTS, TRAIN_BOOKS, model_label, path_label,
                          require_books, require_model, stored)
from bench.uio import book_paths, first_tokens
from lora import lora_disabled, lora_parameters, remove_lora
from model import Transformer, generate
from protocol import Window, evaluate_blocks, score_block, write_json, write_text_atomic
from templora import TempLoRAConfig, add_adapter, check_config, config_record, eval_block, lr_at
from train_block import block_loss, make_optimizer

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
METHODS = ("base-long", "base-short", "templora", "bpt", "dcis", "uio", "supra", "lolcats")
DCIS_CONFIG = RESULTS / "dcis" / "dcis-checkpoint"
OUT = RESULTS / "passkey"
MARGIN = 64  # positions past the text that a whole-text window keeps for the question and the answer
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUICK = dict(lengths="150,190", depths="0.2,0.6", keys=2, distractors=3, answer_tokens=4)


# ----------------------------------------------------------------------------- the probe

def make_keys(seed: int, n_keys: int, n_distractors: int, digits: int = 5) -> list[tuple[str, list[str]]]:
    """n_keys (key, distractors) pairs of `digits`-digit numbers from a local generator: the distractors
    are distinct and never equal the key. Key i depends only on (seed, i, ...), not on the grid."""
    lo, hi = 10 ** (digits - 1), 10 ** digits
    if n_distractors > hi - lo - 1:
        raise ValueError(f"--distractors {n_distractors}: there are only {hi - lo - 1} other {digits}-digit keys")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_keys):
        key = rng.randrange(lo, hi)
        others = set()
        while len(others) < n_distractors:
            k = rng.randrange(lo, hi)
            if k != key:
                others.add(k)
        pairs.append((str(key), [str(k) for k in sorted(others)]))
    return pairs


def plant(haystack: list[int], needle: list[int], length: int, depth: float) -> tuple[list[int], int]:
    """`length` tokens: haystack tokens with the needle's tokens inserted after depth x (length - needle)
    of them (token 0 stays first: a BOS). Returns the ids and the needle's first index."""
    n_hay = length - len(needle)
    if n_hay < 2 or len(haystack) < n_hay:
        raise ValueError(f"a {length}-token probe needs {n_hay} haystack tokens beside the {len(needle)}-token "
                         f"needle (the book has {len(haystack)})")
    at = max(1, round(depth * n_hay))
    return haystack[:at] + needle + haystack[at:n_hay], at


def answer_digits(text: str) -> str:
    """The first run of digits in a decoded answer ('' if none): what exact match compares with the key."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


def rank_credit(logliks: list[float]) -> float:
    """logliks[0] is the true key's, the rest the distractors'. 1 if the true key is ranked first alone, 1/n
    if n candidates tie at the top with it (so a model that cannot tell them apart scores chance), else 0."""
    if not all(math.isfinite(x) for x in logliks):
        raise ValueError(f"a candidate's log-likelihood is not finite: {logliks}")
    best = max(logliks)
    return 1.0 / logliks.count(best) if logliks[0] == best else 0.0


def ask(reading, tok, key: str, distractors: list[str], answer_tokens: int) -> dict:
    """The two scores of one probe from a `reading` (what a method kept after reading text + question):
    reading.loglik(tokens) = log p(tokens | text), reading.greedy(n) = n greedily decoded tokens."""
    logliks = [reading.loglik(tok.encode(ANSWER.format(key=k))) for k in [key, *distractors]]
    answer = tok.decode(reading.greedy(answer_tokens))
    return {"loglik_key": logliks[0], "loglik_distractors": logliks[1:], "rank_credit": rank_credit(logliks),
            "rank": 1 + sum(x > logliks[0] for x in logliks[1:]), "answer": answer,
            "exact": answer_digits(answer) == key}


class WindowReading:
    """The text as a KV-cache window (protocol.Window) holds it after the last block. Each question is asked
    of a copy, so every candidate sees the same cache: the text's pending tokens and the candidate are fed
    as score_block feeds a block (recomputing first, as the protocol does, if they would overflow W)."""

    def __init__(self, model: Transformer, window: Window, text: list[int], n_vocab: int):
        self.model, self.window, self.text, self.n_vocab = model, window, text, n_vocab

    def loglik(self, tokens: list[int]) -> float:
        ids = self.text + tokens
        return -score_block(self.model, copy.deepcopy(self.window), ids, len(self.text), len(ids))

    def greedy(self, n: int) -> list[int]:
        w = copy.deepcopy(self.window)
        w.make_room(len(self.text), n)
        return generate(self.model, w.cache, self.text[w.end:], w.length, n, n_vocab=self.n_vocab)

    def first_visible(self, n: int) -> int:
        """Index of the first text token the question (and n answer tokens) attends to."""
        w = copy.deepcopy(self.window)
        w.make_room(len(self.text), n)
        return w.start


class StateReading:
    """The text as a linearised model's state holds it (methods.supra.RecurrentState: all of it, decayed;
    methods.lolcats.LoLCATsState: all of it in S and z, the last 63 tokens exactly). Copies of the state
    answer, as copies of the window do."""

    def __init__(self, model: Transformer, state, text: list[int], n_vocab: int):
        self.model, self.state, self.text, self.n_vocab = model, state, text, n_vocab

    def loglik(self, tokens: list[int]) -> float:
        from methods.supra import score_block as score_state
        ids = self.text + tokens
        return -score_state(self.model, copy.deepcopy(self.state), ids, len(self.text), len(ids))

    def greedy(self, n: int) -> list[int]:
        s = copy.deepcopy(self.state)
        return generate(self.model, s, self.text[s.length:], s.length, n, n_vocab=self.n_vocab)

    def first_visible(self, n: int) -> int:
        return 0  # nothing is dropped, only decayed


class UIOReading:
    """The text as UIO holds it after the last block: the memories of every earlier block in the Reader's
    cache, and the last block's own tokens. The last block, the question and a candidate are read as one
    segment after the memories, as the Reader reads a block (the question extends the last segment)."""

    def __init__(self, model: Transformer, uio, reader, text: list[int], seg_start: int, n_vocab: int):
        self.model, self.uio, self.reader, self.text, self.seg_start = model, uio, reader, text, seg_start
        self.n_vocab = n_vocab

    def _read(self, seg: list[int], room: int):
        """The segment read after the memories in a copy of the Reader's cache (with room for `room` more
        tokens); the final hidden states (1, len(seg), dim), the cache, its per-layer lengths and position."""
        from methods.uio import prefix_lengths, read_segment
        from model import KVCache
        model, src = self.model, self.reader.cache
        lengths, position = prefix_lengths(model, self.uio, self.reader.memories)
        cache = KVCache(model.args, 1, max(lengths) + len(seg) + room, src.k[0].device, src.k[0].dtype)
        for i, n in enumerate(lengths):
            cache.k[i][:, :, :n] = src.k[i][:, :, :n]
            cache.v[i][:, :, :n] = src.v[i][:, :, :n]
        self.uio.use("base")
        emb = model.tok_embeddings(torch.tensor([seg], device=src.k[0].device))
        return read_segment(model, cache, lengths, position, emb), cache, lengths, position

    @torch.no_grad()
    def loglik(self, tokens: list[int]) -> float:
        from methods.uio import segment_nll
        ids = self.text + tokens
        hidden, *_ = self._read(ids[self.seg_start:-1], 0)          # position j predicts token seg_start + j + 1
        targets = torch.tensor([tokens], device=hidden.device)
        return -segment_nll(self.model, hidden[:, -len(tokens):], targets).item()

    @torch.no_grad()
    def greedy(self, n: int) -> list[int]:
        from methods.uio import read_segment
        seg = self.text[self.seg_start:]
        hidden, cache, lengths, position = self._read(seg, n)
        new = []
        for step in range(n):
            logits = self.model.output(hidden[:, -1:])[0, -1, :self.n_vocab]
            if not torch.isfinite(logits).all():
                raise ValueError("uio: the logits of the answer are not finite")
            new.append(int(logits.argmax()))
            offset = len(seg) + step                                 # tokens of this segment already in the cache
            hidden = read_segment(self.model, cache, [cached + offset for cached in lengths], position + offset,
                                  self.model.tok_embeddings(torch.tensor([[new[-1]]], device=hidden.device)))
        return new

    def first_visible(self, n: int) -> int:
        return self.seg_start  # earlier tokens only through their memories


# ----------------------------------------------------------------------------- each method reads the text

def scaled_knobs(a: argparse.Namespace, length: int) -> TempLoRAConfig:
    """The replication's Δ, L_T, W, L_x scaled by length / --knobs-at; lr, rank, epochs as given."""
    f = length / a.knobs_at
    d, t, w, k = (max(2, round(f * x)) for x in (REPLICATION.delta, REPLICATION.context, REPLICATION.window,
                                                REPLICATION.keep))
    return replace(REPLICATION, delta=d, context=t, window=w, keep=min(k, w - d), lr=a.lr, rank=a.rank,
                   epochs=a.epochs, seed=a.adapter_seed)


def method_settings(a: argparse.Namespace, method: str, length: int, max_len: int) -> dict:
    """What a method's reading depends on, as its results record it (and a rerun must match)."""
    cfg = scaled_knobs(a, length)
    if method in ("templora", "bpt"):
        if method == "bpt":
            cfg = replace(cfg, context=length)  # every token before the block: the long L_T that BPT makes cheap
        return {"config": config_record(cfg) | {"blockwise": a.blockwise if method == "bpt" else 0}}
    if method == "base-short":
        if cfg.window > max_len:
            raise ValueError(f"--lengths {length}: the window W={cfg.window} exceeds the model's {max_len} positions")
        return {"delta": cfg.delta, "window": cfg.window, "keep": cfg.keep}
    if method in ("base-long", "dcis"):
        if length + MARGIN > max_len:
            raise ValueError(f"--lengths {length}: {method} needs a window of {length} + {MARGIN} positions (the "
                             f"text, the question, the answer); the model has {max_len}")
        return {"delta": cfg.delta, "window": length + MARGIN, "keep": (length + MARGIN) // 2}
    if method == "uio":
        return {"delta": cfg.delta, "uio": {"memories": max(1, cfg.delta // a.uio_compression), "rank": a.uio_rank,
                                            "alpha": a.uio_alpha, "bos": a.bos, "sink": True, "layer0_memory": False,
                                            "adapters": path_label(a.uio_adapters) if a.uio_adapters else None}}
    return {"delta": cfg.delta}  # supra, lolcats: a state, no window


def read_window(model, text: list[int], n_context: int, s: dict, n_vocab: int, scorer: str = "base"):
    """The base (or stretched) model reads the context in blocks of Δ through a sliding window."""
    window = Window(model, s["window"], s["keep"])
    r = evaluate_blocks(text[:n_context], s["delta"],
                        lambda i, start, end: {f"nll_{scorer}": score_block(model, window, text, start, end)})
    return r, {scorer: WindowReading(model, window, text, n_vocab)}


def read_state(model, text: list[int], n_context: int, s: dict, n_vocab: int, method: str = "supra"):
    """A linearised model (SUPRA: RecurrentState; LoLCATs: LoLCATsState) folds the context into its state."""
    from methods.lolcats import LoLCATsState
    from methods.supra import RecurrentState
    from methods.supra import score_block as score_state
    state = LoLCATsState(model) if method == "lolcats" else RecurrentState(model)
    r = evaluate_blocks(text[:n_context], s["delta"],
                        lambda i, start, end: {f"nll_{method}": score_state(model, state, text, start, end)})
    return r, {method: StateReading(model, state, text, n_vocab)}


def read_uio(model, text: list[int], n_context: int, s: dict, n_vocab: int, adapters: str | None):
    """UIO reads the context in blocks of Δ (methods.uio.Reader: each block after the memories of the blocks
    before it), then the question extends the last block."""
    from methods.uio import UIO, Reader, UIOConfig
    c = s["uio"]
    uio = UIO(model, UIOConfig(segment=s["delta"], memories=c["memories"], rank=c["rank"], alpha=c["alpha"],
                               memory_init=c["bos"], seed=0, sink=True, layer0_memory=False, bos=c["bos"]))
    if adapters:
        from safetensors.torch import load_file
        uio.load(load_file(adapters, device=str(model.tok_embeddings.weight.device)))
    try:
        reader = Reader(model, uio, text[:n_context], s["delta"])
        r = evaluate_blocks(text[:n_context], s["delta"], reader)
        seg_start = r["chunks"][-1]["start"] - 1                    # the last block's input starts a token earlier
        return r, {"uio": UIOReading(model, uio, reader, text, seg_start, n_vocab)}, uio
    except BaseException:
        uio.remove()
        raise


def read_templora(model, text: list[int], n_context: int, s: dict, n_vocab: int, then):
    """templora.evaluate's loop on the context (eval_block on every block: score base and adapter, train),
    then `then(readings)` asks the question of the trained adapter's window, before the adapter is removed."""
    knobs = {k: v for k, v in s["config"].items() if k not in ("alpha", "base_window", "blockwise")}
    cfg = TempLoRAConfig(**knobs)
    loss_fn = block_loss
    if s["config"]["blockwise"]:
        from methods import bpt
        loss_fn = partial(bpt.block_loss, q_block=s["config"]["blockwise"])
    check_config(cfg, model)
    base_win, lora_win = Window(model, cfg.window, cfg.keep), Window(model, cfg.window, cfg.keep)  # as evaluate
    wrappers = add_adapter(model, cfg)
    try:
        optimizer = make_optimizer(lora_parameters(model), cfg.lr, cfg.weight_decay)
        r = evaluate_blocks(text[:n_context], cfg.delta, lambda i, start, end: eval_block(
            model, text, start, end, base_win, lora_win, optimizer, lr_at(i, cfg), cfg, loss_fn))
        out = then({"templora": WindowReading(model, lora_win, text, n_vocab)})
        with lora_disabled(model):  # the same run's base model, same window: must equal base-short
            out |= then({"base": WindowReading(model, base_win, text, n_vocab)})
    finally:
        remove_lora(model, wrappers)
    return r, out


def load_method_model(a: argparse.Namespace, method: str) -> Transformer:
    from load_llama import args_from_config, load_model, read_json
    dtype = DTYPES[a.dtype]
    if method == "dcis":
        path = Path(a.dcis_config) / "config.json"
        if not path.is_file():
            raise ValueError(f"--dcis-config: no config.json in {a.dcis_config} (bench.dcis writes it)")
        stretched = args_from_config(read_json(path), str(path))
        return load_model(a.model, a.device, dtype,
                          {"max_seq_len": stretched.max_seq_len, "rope_scaling": stretched.rope_scaling})
    if method == "supra":
        from methods.supra import load_linearized
        model, _ = load_linearized(a.supra_checkpoint, a.device, dtype, a.model)
        return model
    if method == "lolcats":
        from methods.lolcats import load_lolcats
        model, _ = load_lolcats(a.lolcats_checkpoint, a.device, dtype, a.model)
        return model
    return load_model(a.model, a.device, dtype)


def weights_digest(model: Transformer) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the grid

def probe_path(out: Path, method: str, length: int, depth: float, key_index: int) -> Path:
    return out / f"{method}-L{length}-d{round(100 * depth):03d}-k{key_index}.json"


def max_positions(a: argparse.Namespace, method: str) -> int:
    """The longest window the method's model takes (the stretched one for dcis), from config.json alone."""
    from load_llama import args_from_config, read_json
    path = Path(a.dcis_config if method == "dcis" else a.model) / "config.json"
    if not path.is_file():
        raise ValueError(f"{'--dcis-config' if method == 'dcis' else '--model'}: no config.json in {path.parent}")
    return args_from_config(read_json(path), str(path)).max_seq_len


def run_method(a, method: str, tok, books: list[Path], keys, cells, out: Path) -> list[Path]:
    """Every (length, depth, key) of one method not yet written; one model load for all of them."""
    model, digest, written = None, None, []
    max_len = max_positions(a, method)
    for length, depth, i in cells:
        path = probe_path(out, method, length, depth, i)
        key, distractors = keys[i]
        book = books[i % len(books)]
        wanted = {"method": method, "length": length, "depth": depth, "key_index": i, "key": key,
                  "distractors": distractors, "seed": a.seed, "book": book.stem, "needle": a.needle,
                  "question": a.question, "answer_template": ANSWER, "answer_tokens": a.answer_tokens,
                  "model": path_label(a.model), "dtype": a.dtype} | method_settings(a, method, length, max_len)
        if method in ("supra", "lolcats"):
            wanted[f"{method}_checkpoint"] = path_label(getattr(a, f"{method}_checkpoint"))
        if method == "dcis":
            wanted["dcis_config"] = path_label(a.dcis_config)
        if stored(path, wanted) is not None:
            continue
        if model is None:
            model = load_method_model(a, method)
            digest = weights_digest(model)
        needle = tok.encode(a.needle.format(key=key))
        ids, at = plant(first_tokens(book, tok, length), needle, length, depth)
        text = ids + tok.encode(a.question)
        n_vocab = tok.n_words
        tic = time.perf_counter()

        def then(readings: dict) -> dict:
            scores = {}
            for name, reading in readings.items():
                visible = reading.first_visible(len(tok.encode(ANSWER.format(key=key))))
                scores[name] = ask(reading, tok, key, distractors, a.answer_tokens) | {
                    "first_visible": visible, "needle_in_window": visible <= at}
            return scores
        if method in ("templora", "bpt"):
            reading, scores = read_templora(model, text, length, wanted, n_vocab, then)
        elif method in ("supra", "lolcats"):
            reading, readings = read_state(model, text, length, wanted, n_vocab, method)
            scores = then(readings)
        elif method == "uio":
            reading, readings, uio = read_uio(model, text, length, wanted, n_vocab, a.uio_adapters)
            try:
                scores = then(readings)
            finally:
                uio.remove()
        else:
            reading, readings = read_window(model, text, length, wanted, n_vocab)
            scores = then(readings)
        wall = time.perf_counter() - tic
        delta = wanted.get("delta") or wanted["config"]["delta"]
        blocks = math.ceil((length - 1) / delta)
        needle_block = (at - 1) // delta
        head = next(scores[k] for k in ("templora", "uio", "supra", "lolcats", "base") if k in scores)
        result = wanted | head | {
            "needle_at": at, "needle_tokens": len(needle), "question_tokens": len(text) - length,
            "blocks": blocks, "needle_block": needle_block, "blocks_after_needle": blocks - 1 - needle_block,
            "scorers": scores, "ppl": {k: v for k, v in reading.items() if k.startswith("ppl_")},
            "wall_s": wall, "read_s": reading["timings"]["total_s"], "device": a.device,
            "model_label": model_label(a.model), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": "python -m bench.passkey"}
        write_json(path, result)
        written.append(path)
        print(f"[{method}] L={length} depth={depth} key {i}: rank credit {head['rank_credit']:.2f} "
              f"(rank {head['rank']}), answer {head['answer']!r} exact {head['exact']}, needle in window "
              f"{head['needle_in_window']}, {wall:.1f} s", flush=True)
    if model is not None and weights_digest(model) != digest:
        raise ValueError(f"[{method}] the base weights changed during the run")
    return written


# ----------------------------------------------------------------------------- tables and heatmaps

def load_results(out: Path) -> list[dict]:
    import json
    return [json.loads(p.read_text()) for p in sorted(out.glob("*-L*-d*-k*.json"))]


def grid_of(results: list[dict], method: str) -> dict:
    """(length, depth) -> the results of one method in that cell."""
    cells = {}
    for r in results:
        if r["method"] == method:
            cells.setdefault((r["length"], r["depth"]), []).append(r)
    return cells


def summary(rs: list[dict]) -> dict:
    return {"n": len(rs), "accuracy": sum(r["rank_credit"] for r in rs) / len(rs),
            "exact": sum(r["exact"] for r in rs), "chance": sum(1 / (1 + len(r["distractors"])) for r in rs) / len(rs),
            "in_window": sum(r["needle_in_window"] for r in rs), "wall_s": sum(r["wall_s"] for r in rs),
            "median_s": statistics.median(r["wall_s"] for r in rs), "mean_rank": sum(r["rank"] for r in rs) / len(rs)}


def markdown(results: list[dict]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    out = ["| method | probes | rank accuracy | chance | mean rank of the key | exact match | needle in the window "
           "| blocks after the needle | wall s: all (median per probe) |", "|---" * 9 + "|"]
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        s = summary(rs)
        back = sorted({r["blocks_after_needle"] for r in rs})
        out.append(f"| {m} | {s['n']} | **{s['accuracy']:.2f}** | {s['chance']:.2f} | {s['mean_rank']:.2f} of "
                   f"{1 + len(rs[0]['distractors'])} | {s['exact']}/{s['n']} | "
                   f"{s['in_window']}/{s['n']} | {back[0]}-{back[-1]} | {s['wall_s']:.1f} "
                   f"({s['median_s']:.2f}) |")
    for m in methods:
        cells = grid_of(results, m)
        lengths = sorted({L for L, _ in cells})
        depths = sorted({d for _, d in cells})
        out += ["", f"{m}: rank accuracy (exact matches / keys) by depth (rows) and length (columns)", "",
                "| depth | " + " | ".join(str(L) for L in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for d in depths:
            row = []
            for L in lengths:
                rs = cells.get((L, d))
                row.append(f"{summary(rs)['accuracy']:.2f} ({summary(rs)['exact']}/{len(rs)})" if rs else "")
            out.append(f"| {d:g} | " + " | ".join(row) + " |")
        out.append("| median s per probe | " + " | ".join(
            f"{summary([r for (L2, _), rs in cells.items() if L2 == L for r in rs])['median_s']:.1f}"
            for L in lengths) + " |")
    return "\n".join(out) + "\n"


def heatmap(results: list[dict], method: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = grid_of(results, method)
    lengths, depths = sorted({L for L, _ in cells}), sorted({d for _, d in cells})
    acc = [[summary(cells[(L, d)])["accuracy"] if (L, d) in cells else math.nan for L in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(lengths), 1.2 + 0.8 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for y, d in enumerate(depths):
        for x, L in enumerate(lengths):
            if (L, d) in cells:
                s = summary(cells[(L, d)])
                ax.text(x, y, f"{s['accuracy']:.2f}\n{s['exact']}/{s['n']} exact", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    chance = summary([r for rs in cells.values() for r in rs])["chance"]
    ax.set(xlabel="haystack length (tokens)", ylabel="needle depth")
    ax.set_title(f"passkey, {method}: rank accuracy (chance {chance:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def report(out: Path) -> str:
    results = load_results(out)
    if not results:
        return ""
    table = markdown(results)
    write_text_atomic(out / "passkey.md", table)
    for m in {r["method"] for r in results}:
        heatmap(results, m, out / f"passkey-{m}.png")
    return table


# ----------------------------------------------------------------------------- command line

def floats(flag: str, text: str, lo: float, hi: float) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(lo <= v <= hi for v in values):
        raise ValueError(f"{flag}: every value must lie in [{lo}, {hi}], got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--books-dir", default=str(EVAL_BOOKS), help="evaluation books (never a training book)")
    p.add_argument("--book-ids", help="comma-separated book ids; key i reads book i (cycling); default: the first "
                                      "--keys books of --books-dir by number")
    p.add_argument("--train-books-dir", default=str(TRAIN_BOOKS), help="the books the methods train on: a haystack "
                   "book found there is refused (not checked when the folder is absent)")
    p.add_argument("--needle", default=NEEDLE, help="the sentence planted in the haystack; {key} marks the key")
    p.add_argument("--question", default=QUESTION, help="what is read after the text, before the answer")
    p.add_argument("--methods", default="base-long,base-short,templora", help=f"any of {','.join(METHODS)}")
    p.add_argument("--lengths", default="512,1024,2048", help="tokens of haystack + needle, before the question")
    p.add_argument("--depths", default="0.1,0.4,0.7", help="needle depths, fractions of the haystack")
    p.add_argument("--keys", type=int, default=5, help="keys (probes) per cell")
    p.add_argument("--distractors", type=int, default=9, help="K: distractor keys per probe (chance 1/(K+1))")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys and distractors (random.Random)")
    p.add_argument("--answer-tokens", type=int, default=8, help="tokens of greedy decoding for exact match")
    p.add_argument("--knobs-at", type=int, default=4096, help="the length at which Temp-LoRA's Δ, L_T, W, L_x "
                                                             "are the replication's; scaled linearly elsewhere")
    p.add_argument("--lr", type=float, default=REPLICATION.lr)
    p.add_argument("--rank", type=int, default=REPLICATION.rank)
    p.add_argument("--epochs", type=int, default=REPLICATION.epochs)
    p.add_argument("--adapter-seed", type=int, default=REPLICATION.seed, help="seed of the adapter's init, dropout")
    p.add_argument("--blockwise", type=int, default=256, help="bpt: query block B_q of the blockwise adapter step")
    p.add_argument("--dcis-config", default=str(DCIS_CONFIG), help="dcis: folder whose config.json holds the "
                                                                   "searched RoPE factors (weights: --model's)")
    p.add_argument("--supra-checkpoint", help="supra: a linearised checkpoint written by bench.supra")
    p.add_argument("--lolcats-checkpoint", help="lolcats: a checkpoint folder written by bench.lolcats")
    p.add_argument("--uio-compression", type=int, default=32, help="uio: tokens per memory token, M = Δ / this "
                                                                   "(the paper's 32x)")
    p.add_argument("--uio-rank", type=int, default=128, help="uio: LoRA r of the encoder and decoder")
    p.add_argument("--uio-alpha", type=float, default=512.0, help="uio: LoRA alpha")
    p.add_argument("--uio-adapters", help="uio: a trained UIO's tensors (uio.safetensors of bench.uio); "
                                          "default: untrained")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--quick", action="store_true", help=f"smoke-test defaults for a tiny checkpoint: {QUICK}")
    if p.parse_args(argv).quick:  # smaller defaults; a flag given beside --quick still wins
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    a.method_list = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.method_list if m not in METHODS]
    if bad or not a.method_list:
        raise ValueError(f"--methods: unknown {bad or a.methods!r} (choose from {', '.join(METHODS)})")
    if "supra" in a.method_list and not a.supra_checkpoint:
        raise ValueError("--supra-checkpoint: the supra method needs a linearised checkpoint (bench.supra writes it)")
    if "lolcats" in a.method_list and not a.lolcats_checkpoint:
        raise ValueError("--lolcats-checkpoint: the lolcats method needs a checkpoint folder (bench.lolcats writes it)")
    for flag, path in (("--lolcats-checkpoint", a.lolcats_checkpoint), ("--uio-adapters", a.uio_adapters)):
        if path and not Path(path).exists():
            raise ValueError(f"{flag}: {path} does not exist")
    if a.uio_adapters and "uio" not in a.method_list:
        raise ValueError("--uio-adapters: has no effect without --methods uio")
    a.length_list = [int(x) for x in floats("--lengths", a.lengths, 2, math.inf)]
    a.depth_list = floats("--depths", a.depths, 0.0, 1.0)
    for flag, v in (("--keys", a.keys), ("--distractors", a.distractors), ("--answer-tokens", a.answer_tokens),
                    ("--uio-compression", a.uio_compression), ("--uio-rank", a.uio_rank),
                    ("--knobs-at", a.knobs_at), ("--rank", a.rank), ("--epochs", a.epochs)):
        if v < 1:
            raise ValueError(f"{flag} must be at least 1, got {v}")
    if "{key}" not in a.needle:
        raise ValueError(f"--needle: {a.needle!r} does not hold {{key}}, where the key goes")
    if not a.question.strip():
        raise ValueError("--question: empty")
    if not a.lr > 0 or a.blockwise < 1:
        raise ValueError(f"--lr must be > 0 and --blockwise >= 1 (got {a.lr}, {a.blockwise})")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        check_args(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    require_model(a.model)
    ids = a.book_ids.split(",") if a.book_ids else None
    require_books(a.books_dir, "--books-dir", ids or ())
    books = [Path(a.books_dir) / f"{i}.txt" for i in ids] if ids else book_paths(a.books_dir)[: a.keys]
    trained_on = [b.stem for b in books if (Path(a.train_books_dir) / b.name).is_file()]
    if trained_on:
        print(f"error: --books-dir: {', '.join(trained_on)} also in --train-books-dir {a.train_books_dir}, which "
              "methods train on: a haystack must be text no method has seen", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    try:
        from load_llama import load_tokenizer, read_json
        tok = load_tokenizer(Path(a.model), read_json(Path(a.model) / "config.json"))
        a.bos = tok.bos_id  # uio: the sink's token and e's start
        keys = make_keys(a.seed, a.keys, a.distractors)
        cells = [(L, d, i) for L in a.length_list for d in a.depth_list for i in range(a.keys)]
        for method in a.method_list:
            run_method(a, method, tok, books, keys, cells, out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(out) + f"\n-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
