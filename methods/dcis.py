"""DCIS: divide-and-conquer search for the RoPE scaling factors (Yang, Xu, Xiong 2024, arXiv 2412.18811).

A model trained on L tokens can read L·s tokens if the frequency θ_i of each RoPE channel pair is divided
by a factor λ_i (model.py, "RoPE"). PI, NTK, YaRN and Llama 3 derive the λ_i from a formula; DCIS searches
them, scored by the perplexity of one long document at the target length L·s:

    λ ← YaRN's factors (or PI's, or NTK's)                                        the start
    every pair gets the offset range [-5, 5]
    for g = d/4, d/8, ..., 1:                                                     coarse to fine
        for each group G of g neighbouring pairs, the lowest frequencies first:
            try λ_G + k for C offsets k evenly spaced over G's range (the other pairs stay)
            keep the best offset by perplexity
            G's range becomes [min, max] of its three best offsets, widened by one step, around the best
    → λ, written as a `longrope` checkpoint config: long_factor = λ, attention factor 0.1·ln(s) + 1

Symbols: d = head_dim; pair i = 0 .. d/2 - 1 turns at θ_i = rope_theta^(-2i/d) (pair 0 fastest); λ_i its
divisor; s the stretch; g the group size; C the offsets per group (the paper's 10 give 620 evaluations at
d = 64: 2 + 4 + 8 + 16 + 32 groups); k an offset. The attention factor (YaRN's) is fixed during the search.

Where this differs from the official code (YL-9/dcis, dcis.py), on purpose:
- the current λ is always a candidate (offset 0, its perplexity already known): a group moves only if an
  offset beats it, so the search never ends worse than it started. The official code moves each group to
  its best offset even when every offset is worse (0 is not on its 10-point grid), and drops offsets with
  perplexity >= 100, so every group of a weak model (all offsets above 100) is skipped without a word;
- the 'pi' start works (the official one compares a function with a string and can never run);
- λ is floored at 1e-4 once, and the floored vector is both scored and kept (the official code scores the
  floored one and keeps the unfloored one);
- a budget (the number of evaluations) and a log of every evaluation keyed by its λ: a run stopped at any
  point resumes where it was, skipping what is logged, and a log made with other settings is refused.
The LongRoPE-style monotone evolutionary rival of the official repository is not reproduced here.
"""
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer, rope_inv_freq, yarn_mscale, yarn_rope
from protocol import write_text_atomic

FIRST_RANGE = (-5.0, 5.0)  # the official start: 4 x 1.25 either side
MIN_FACTOR = 1e-4          # λ must stay positive: a frequency divided by 0 or less is no rotation


# ----------------------------------------------------------------------------- the starting points

def start_factors(init: str, args: ModelArgs, s: float, old_len: int) -> list[float]:
    """λ_i (one per pair, float64 values) of a formula to start from:
    pi    λ_i = s                                       (position interpolation)
    yarn  YaRN's ramp, as model.yarn_rope computes it    (the paper's start)
    ntk   λ_i = s^(2i/(d-2)), the divisors that NTK's base rope_theta·s^(d/(d-2)) amounts to"""
    plain, _ = rope_inv_freq(replace(args, rope_scaling=None))  # (d/2,) θ_i, on the CPU: same on every machine
    pairs = torch.arange(len(plain), dtype=torch.float64)
    if init == "pi":
        return [float(s)] * len(plain)
    if init == "yarn":
        divisors, _ = yarn_rope(plain, {"factor": s, "original_max_position_embeddings": old_len})
        return divisors.double().tolist()
    if init == "ntk":
        return (s ** (2 * pairs / (args.head_dim - 2))).tolist()
    raise ValueError(f"unknown start {init!r} (pi, yarn, ntk)")


def ntk_theta(rope_theta: float, s: float, head_dim: int) -> float:
    """NTK-aware scaling is a change of base: pair 0 keeps its frequency, the slowest pair is divided by s."""
    return rope_theta * s ** (head_dim / (head_dim - 2))


def longrope_scaling(factors: list[float], s: float, old_len: int, attention_factor: float) -> dict:
    """The searched λ as model.py's (and transformers') `longrope` rope_scaling. short_factor = long_factor:
    transformers picks the set by sequence length, and with both equal it rotates every length the same way
    as our model (which always uses long_factor for a stretched config), cached keys included."""
    return {"rope_type": "longrope", "factor": s, "original_max_position_embeddings": old_len,
            "long_factor": list(factors), "short_factor": list(factors), "attention_factor": attention_factor}


# ----------------------------------------------------------------------------- the objective

@torch.no_grad()
def document_nll(model: Transformer, ids: list[int], rows: int = 2048) -> float:
    """Summed NLL (nats) of ids[1:], each token given all before it: one forward of len(ids) tokens.
    The output head runs on `rows` positions at a time: 16K positions x a 49K vocabulary would be 3 GiB of
    float32 logits at once, most of the memory of the whole forward."""
    device = next(model.parameters()).device
    tokens = torch.tensor([ids], device=device)                                 # (1, T)
    h = model.hidden_states(model.tok_embeddings(tokens))[0, :-1]              # (T - 1, dim): the last predicts nothing
    targets = tokens[0, 1:]                                                     # (T - 1,)
    nll = 0.0
    for a in range(0, len(targets), rows):
        logits = model.output(h[a:a + rows]).float()                          # (rows, vocab)
        nll += F.cross_entropy(logits, targets[a:a + rows], reduction="sum").item()
    if not math.isfinite(nll):
        raise ValueError(f"the NLL of a {len(ids)}-token document is {nll}: an error, never a result")
    return nll


def stretched_perplexity(model: Transformer, ids: list[int], factors: list[float], s: float, old_len: int,
                         attention_factor: float) -> float:
    """Perplexity of the document with RoPE divided by `factors`: the search's objective."""
    model.args = replace(model.args, rope_scaling=longrope_scaling(factors, s, old_len, attention_factor))
    return math.exp(document_nll(model, ids) / (len(ids) - 1))


# ----------------------------------------------------------------------------- the search (the paper's algorithm)

def dcis(score: Callable[[list[float]], float], start: list[float], offsets: int = 10, min_group: int = 1,
         max_evals: int | None = None, known: dict[str, float] | None = None, on_eval=None) -> dict:
    """Divide-and-conquer search of λ (one per pair) minimising score(λ), from `start`.

    `offsets` = C per group; groups of d/4, d/8, ... down to `min_group` pairs. At most `max_evals`
    evaluations, the start's included (None: the whole schedule); stopping early keeps the best so far.
    `known` maps json.dumps(λ) -> score of evaluations already made (a resumed run): those are not redone,
    and the new ones are added to it. `on_eval(λ, value, fresh, count)` is called after each evaluation.
    Returns the best λ, its score, the start's score, the number of evaluations and each group's trials."""
    if offsets < 2:
        raise ValueError(f"offsets per group must be at least 2 (got {offsets})")
    known = {} if known is None else known
    count = 0

    def evaluate(factors: list[float]) -> float:
        nonlocal count
        key = json.dumps(factors)
        fresh = key not in known
        if fresh:
            known[key] = score(factors)
        count += 1
        if on_eval:
            on_eval(factors, known[key], fresh, count)
        return known[key]

    n = len(start)
    best = [max(x, MIN_FACTOR) for x in start]
    best_value = start_value = evaluate(best)
    ranges = [FIRST_RANGE] * n        # the offset range of each pair (a group's is its first pair's)
    groups, group, stopped = [], n // 2, False
    while group >= max(min_group, 1) and not stopped:
        for first in reversed(range(0, n, group)):   # the last pairs turn slowest: low frequencies first
            pairs = range(first, min(first + group, n))
            lo, hi = ranges[first]
            step = (hi - lo) / (offsets - 1)
            ks = [lo + step * c for c in range(offsets)]
            if max_evals is not None and len(ks) > max_evals - count:  # the budget ends inside this group
                ks, stopped = ks[: max(0, max_evals - count)], True
                if not ks:
                    break
            # try each offset on this group only (the other pairs keep the best λ so far)
            candidates = [[max(x + k, MIN_FACTOR) if i in pairs else x for i, x in enumerate(best)] for k in ks]
            values = [evaluate(c) for c in candidates]
            # the incumbent (offset 0, value known) is a candidate too; a tie keeps the smaller move
            trials = sorted([(best_value, 0.0, best), *zip(values, ks, candidates)], key=lambda t: (t[0], abs(t[1])))
            best_value, chosen, best = trials[0]
            # the next, finer groups inside this one search around the three best offsets, one step wider
            top = [k for _, k, _ in trials[:3]]
            for i in pairs:
                ranges[i] = (min(top) - step - chosen, max(top) + step - chosen)
            groups.append({"size": group, "pairs": [pairs.start, pairs.stop], "range": [lo, hi], "offsets": ks,
                           "values": values, "chosen": chosen, "best": best_value})
            if stopped:
                break
        group //= 2
    return {"factors": best, "value": best_value, "start_value": start_value, "evaluations": count,
            "complete": not stopped, "groups": groups}


def schedule_size(pairs: int, offsets: int, min_group: int = 1) -> int:
    """Evaluations of a whole search: the start, then C per group at each level."""
    total, group = 1, pairs // 2
    while group >= max(min_group, 1):
        total += offsets * math.ceil(pairs / group)
        group //= 2
    return total


# ----------------------------------------------------------------------------- on a model, resumable

def read_log(path: Path, settings: dict) -> dict[str, float]:
    """The evaluations logged by an earlier run with the same settings (none if there is no log)."""
    if not path.exists():
        return {}
    log = json.loads(path.read_text())
    differ = sorted(k for k in settings.keys() | log["settings"].keys() if log["settings"].get(k) != settings.get(k))
    if differ:
        raise ValueError(f"{path} was made with other settings ({', '.join(differ)}): use another log or delete it")
    return log["evaluations"]


def write_json(path: Path, data: dict) -> None:
    """protocol's atomic write, not its strict JSON: these logs may hold NaN (a skipped step's gradient norm)."""
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def search(model: Transformer, ids: list[int], s: float, old_len: int, init: str = "yarn", offsets: int = 10,
           min_group: int = 1, max_evals: int | None = None, log_path: Path | None = None,
           settings: dict | None = None, progress=print) -> dict:
    """DCIS on `model` (plain RoPE) for a stretch of s, scored on `ids` (one document of L·s tokens).
    With `log_path`, every evaluation is logged (with `settings`, which a resumed run must match) and
    logged ones are not redone. The model's RoPE is left as it was. Returns dcis()'s result and the
    attention factor; `wall_s` counts this run's own evaluations."""
    if model.args.rope_scaling is not None:
        raise ValueError(f"DCIS starts from plain RoPE, but the model has {model.args.rope_scaling['rope_type']!r}")
    attention_factor = yarn_mscale(s)
    settings = (settings or {}) | {"s": s, "original": old_len, "init": init, "offsets": offsets,
                                   "min_group": min_group, "attention_factor": attention_factor,
                                   "document_tokens": len(ids), "rope_theta": model.args.rope_theta}
    known = read_log(log_path, settings) if log_path else {}
    start = start_factors(init, model.args, s, old_len)
    total = min(schedule_size(len(start), offsets, min_group), max_evals or math.inf)
    t0, plain, lowest = time.perf_counter(), model.args, [math.inf]

    def on_eval(factors, value, fresh, count):
        lowest[0] = min(lowest[0], value)
        if fresh and log_path:
            write_json(log_path, {"settings": settings, "evaluations": known})
        if fresh and progress:
            progress(f"[dcis {count}/{total}] ppl {value:.4f} (best {lowest[0]:.4f})  {time.perf_counter() - t0:.0f} s")

    try:
        result = dcis(lambda f: stretched_perplexity(model, ids, f, s, old_len, attention_factor), start,
                      offsets, min_group, max_evals, known, on_eval)
    finally:
        model.args = plain
    return result | {"attention_factor": attention_factor, "init": init, "start": start,
                     "wall_s": time.perf_counter() - t0, "settings": settings}


# ----------------------------------------------------------------------------- the result as a checkpoint

def write_checkpoint(source: Path, out: Path, factors: list[float], s: float, old_len: int,
                     attention_factor: float) -> Path:
    """A checkpoint directory that both load_llama and transformers read as the stretched model: its own
    config.json (max_position_embeddings = L·s, rope_parameters of type longrope) and a symbolic link to
    every other file of `source` (weights, tokenizer), which is never copied or changed."""
    source, out = Path(source).resolve(), Path(out)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or config.get("rope_scaling") or {}
    config.pop("rope_scaling", None)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source / 'config.json'}: already has RoPE scaling {rope}; DCIS starts from plain RoPE")
    theta = rope.get("rope_theta") or config["rope_theta"]
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": theta} | {
        k: v for k, v in longrope_scaling(factors, s, old_len, attention_factor).items() if k != "rope_type"}
    config["rope_theta"] = theta
    config["max_position_embeddings"] = round(old_len * s)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.name != "config.json":
            link = out / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f)
    write_json(out / "config.json", config)
    return out
