"""The evaluation protocol every long-context method here is scored by (PG19-style, as in the Temp-LoRA
paper): token 0 of the text is context only; tokens 1.. are cut into blocks of Δ tokens, and a method
scores each block in turn, seeing only the text before it. A method is one `step` function:

    step(i, start, end) -> {"nll_<name>": summed NLL of ids[start:end] in nats, ..., any extras}

one `nll_<name>` per scorer it runs (Temp-LoRA scores "base" and "templora"), plus whatever else it wants
kept per block (train losses, a recompute flag, FLOPs). `evaluate_blocks` calls it for every block and
returns `ppl_<name>` = exp(summed NLL / scored tokens) for each scorer, the blocks, and the wall time.

Also here: `Window`, the sliding KV-cache window that scores a block with a model's ordinary attention,
and `score_block`, which does so; and `write_json`, how every result file is written (strict JSON, atomically).
"""
import json
import math
import os
import secrets
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model import KVCache, Transformer

# position buckets of the text (token index of a block's first token) for tables by position
POSITION_EDGES = (0, 4096, 8192, 16384, 32768, 65536, 131072)


def perplexity(chunks: list[dict], name: str) -> float:
    """exp(total NLL / total tokens) of scorer `name` over `chunks` (the blocks' own token counts)."""
    return math.exp(sum(c[f"nll_{name}"] for c in chunks) / sum(c["tokens"] for c in chunks))


def scorers(chunks: list[dict]) -> list[str]:
    """The scorer names present in the blocks: "nll_base" -> "base"."""
    return [key[len("nll_"):] for key in chunks[0] if key.startswith("nll_")]


def evaluate_blocks(ids: list[int], delta: int, step, progress=None) -> dict:
    """Run `step(i, start, end)` on every block of `delta` tokens of `ids` (token 0 is context only) and
    gather the results. `progress(chunks, done, total, elapsed)` is called after each block.
    A non-finite NLL stops the run: it is an error, never a result."""
    if delta < 1 or len(ids) < delta + 1:
        raise ValueError(f"the text has {len(ids)} tokens: fewer than one block (--delta {delta}) + 1")
    chunks, t0 = [], time.perf_counter()
    for i, start in enumerate(range(1, len(ids), delta)):
        end = min(start + delta, len(ids))
        tic = time.perf_counter()
        chunk = {"start": start, "tokens": end - start} | step(i, start, end)
        chunk["wall_s"] = time.perf_counter() - tic
        bad = [k for k in chunk if k.startswith("nll_") and not math.isfinite(chunk[k])]
        if bad:
            raise ValueError(f"block {i} (tokens {start}..{end}): {', '.join(bad)} is not finite")
        chunks.append(chunk)
        if progress:
            progress(chunks, end, len(ids), time.perf_counter() - t0)
    total = time.perf_counter() - t0
    n = sum(c["tokens"] for c in chunks)
    return {**{f"ppl_{name}": perplexity(chunks, name) for name in scorers(chunks)},
            "scored_tokens": n, "timings": {"total_s": total, "tokens_per_s": n / total}, "chunks": chunks}


def position_buckets(edges=POSITION_EDGES) -> list[tuple[int, float, str]]:
    """(lo, hi, label) of each position bucket: [0, 4K) "0-4K", ..., [last edge, inf) "<last>K+"."""
    his = edges[1:] + (math.inf,)
    return [(lo, hi, f"{lo // 1024}K+" if hi == math.inf else f"{lo // 1024}-{hi // 1024}K")
            for lo, hi in zip(edges, his)]


def position_table(chunks: list[dict], names: list[str] | None = None, edges=POSITION_EDGES) -> str:
    """Perplexity by position in the text (exp of mean NLL within each bucket), one column per scorer;
    with two or more, the change of the last against the first."""
    names = names or scorers(chunks)
    header = f"{'position':<14}{'tokens':>8}" + "".join(f"{'ppl_' + n:>14}" for n in names)
    rows = [header + ("    change" if len(names) > 1 else "")]
    for lo, hi, label in position_buckets(edges):
        inside = [c for c in chunks if lo <= c["start"] < hi]
        if not inside:
            continue
        ppl = [perplexity(inside, n) for n in names]
        row = f"{label:<14}{sum(c['tokens'] for c in inside):>8}" + "".join(f"{p:14.3f}" for p in ppl)
        rows.append(row + (f"  {100 * (ppl[-1] / ppl[0] - 1):+7.1f}%" if len(names) > 1 else ""))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- scoring with a KV-cache window

class Window:
    """The KV cache over the tail of the text, and which tokens it holds.

    It holds text[start : start + length]; later tokens are pending (not yet encoded). When encoding
    the pending tokens and the next block would overflow W positions, the cache is recomputed: it
    restarts from the last L_x tokens of the text, each encoded exactly once, with the current weights.
    After `invalidate()` (no cache reuse) the next block recomputes too: the same tokens, re-encoded.
    `recomputes` counts every rebuild of either kind."""

    def __init__(self, model: Transformer, size: int, keep: int):
        if not 0 < keep < size:
            raise ValueError(f"a window keeps 0 < L_x < W tokens on a recompute (got L_x={keep}, W={size})")
        p = next(model.parameters())
        self.cache = KVCache(model.args, 1, size, p.device, p.dtype)
        self.size, self.keep = size, keep
        self.start = self.length = 0
        self.recomputes = 0
        self.stale = False  # invalidate() was called: the cached K/V must be re-encoded before use

    @property
    def end(self) -> int:  # index in the text of the first token not in the cache
        return self.start + self.length

    def make_room(self, n_text: int, n_block: int) -> bool:
        """Before a block: recompute if pending tokens + the block's new tokens would not fit (restart from
        the last L_x tokens), or if the cache was invalidated (re-encode its tokens). True: it was rebuilt."""
        pending = n_text - self.end
        # the block's last token is never fed (nothing after it is predicted from it), hence the - 1
        fits = self.length + pending + n_block - 1 <= self.size
        if fits and not self.stale:
            return False
        if not fits:
            self.start = max(0, n_text - self.keep)
        self.length, self.stale = 0, False
        self.recomputes += 1
        return True

    def advance(self, n: int) -> None:
        """n more tokens, text[end : end + n], were just encoded into the cache."""
        if self.length + n > self.size:
            raise ValueError(f"window of {self.size} positions cannot hold {self.length} + {n}")
        self.length += n

    def invalidate(self) -> None:
        """Drop the cached K/V but keep the same tokens: the next make_room re-encodes them (a recompute)."""
        self.length, self.stale = 0, self.length > 0


@torch.no_grad()
def score_block(model: Transformer, window: Window, ids: list[int], start: int, end: int) -> float:
    """Summed NLL (nats) of ids[start:end], each token given everything before it that the window holds."""
    window.make_room(start, end - start)
    feed = ids[window.end: end - 1]  # pending tokens, then the block but its last token
    logits = model(torch.tensor([feed], device=window.cache.k[0].device), window.length, window.cache,
                   last=end - start)                                                    # (1, end - start, vocab)
    window.advance(len(feed))
    targets = torch.tensor(ids[start:end], device=logits.device)
    return F.cross_entropy(logits[0].float(), targets, reduction="sum").item()


# ----------------------------------------------------------------------------- result files

def write_text_atomic(path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or a resumed
    run) sees the old file or the new one, never half of one, and a failure (full disk, Ctrl-C) leaves
    the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # same folder: rename is atomic
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": a fresh file with the usual permissions
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj, default=None) -> None:
    """`obj` as strict JSON (no NaN or Infinity, which strict parsers reject), written atomically.
    `default` as in json.dumps (e.g. str, for values JSON has no type for)."""
    try:
        text = json.dumps(obj, indent=1, allow_nan=False, default=default) + "\n"
    except ValueError as e:  # a non-finite float: a bug upstream, never written as a result
        raise ValueError(f"{path}: not written: the result holds a non-finite number ({e})") from None
    write_text_atomic(path, text)
