"""Synthetic recall: does UIO-LLMs' unbiased truncation of BPTT learn what the recent-only truncation cannot?

A key is stated in segment 0 and asked for at the end of segment k; the loss is on the answer only. The
answer can reach segment k only through the memory of segment 0 (methods/uio.py), and the encoder learns to
write it there only from a gradient that flows from segment k's loss back to segment 0's encoder pass:

    segment 0      [ BOS  f f v' f MARK key f f v' f ... ]     f: filler, v': distractor values
    segment 1..k-1 [ f f v' f f f v' f ... ]
    segment k      [ f v' f f f ... f QUERY ] -> key          the only target with a loss

With the live set R of keep = 2 encoder graphs, recent-only keeps segments k-2 and k-1 when segment k is
read: for k > 2 the path to segment 0 is cut, every step. The reservoir keeps segment 0 with probability
2/k and weights that gradient k/2 (unbiased); full BPTT keeps every graph. No memory reads segment k alone
(chance: 1 / --values). The model is a tiny Llama trained from scratch on the task, its base weights
together with UIO's e and LoRAs, in the default form (a BOS sink ahead of the memories, no layer-0 memory).

    python -m bench.recall --out DIR                 # the grid: 4 variants x --ks x --seeds
    python -m bench.recall --quick --out DIR         # seconds: the same grid on smoke-test sizes

Resumable: one JSON per (variant, k, seed), recall-<variant>-k<k>-seed<seed>.json, written when it is done;
one made with other settings is refused. Then recall.json (every unit), recall.md (the table) and
recall.png (accuracy against k).
"""
import argparse
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import RESULTS, stored
from methods.uio import BPTT_MODES, UIO, UIOConfig, decode, encode, segment_nll, text_gradient
from model import ModelArgs, Transformer
from protocol import write_json

COMMAND = "python -m bench.recall " + shlex.join(sys.argv[1:])
VARIANTS = ("nomemory", *(m for m in ("recent", "reservoir", "full") if m in BPTT_MODES))
BOS, MARK, QUERY = 0, 1, 2  # token ids; the values follow, then the filler


@dataclass
class Task:
    segment: int = 16        # L: tokens per segment
    values: int = 16         # distinct keys (chance accuracy 1 / values)
    filler: int = 32         # distinct filler tokens
    distractors: int = 2     # value tokens scattered in every segment but the last, besides the key

    @property
    def vocab(self) -> int:
        return 3 + self.values + self.filler


def make_texts(task: Task, k: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """n texts of k + 1 segments: ids (n, (k+1) L + 1), the answer mask over the targets (n, (k+1) L) and the
    keys (n,). The target at index (k+1) L - 1 (the token after QUERY) is the key."""
    L, S = task.segment, k + 1
    values = lambda *shape: 3 + torch.randint(0, task.values, shape, generator=generator)  # noqa: E731
    ids = 3 + task.values + torch.randint(0, task.filler, (n, S * L + 1), generator=generator)
    keys, rows = values(n), torch.arange(n)
    where = 1 + torch.randint(0, L - 3, (n,), generator=generator)  # MARK key inside segment 0, after BOS
    for s in range(S - 1):  # distractor values in every segment before the question, never over BOS, MARK, key
        order = torch.rand(n, L, generator=generator)
        if s == 0:
            order[:, 0] = order[rows, where] = order[rows, where + 1] = 2.0  # sorted last: never picked
        slots = order.argsort(1)[:, :task.distractors] + s * L
        ids.scatter_(1, slots, values(n, task.distractors))
    ids[:, 0] = BOS
    ids[rows, where], ids[rows, where + 1] = MARK, keys
    ids[:, S * L - 1], ids[:, S * L] = QUERY, keys
    answer = torch.zeros(n, S * L, dtype=torch.bool)
    answer[:, S * L - 1] = True
    return ids, answer, keys


def tiny_llama(task: Task, k_max: int, memories: int, seed: int) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                     vocab_size=task.vocab, rope_theta=10000.0, max_seq_len=1 + k_max * memories + task.segment)
    return Transformer(args)


SIZES = {
    "full": dict(ks="2,4,6", seeds="0,1,2", steps=500, batch=32, eval_texts=512, lr=3e-3),
    "quick": dict(ks="1,2,3", seeds="0,1", steps=3, batch=4, eval_texts=16, lr=3e-3),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    full = SIZES["full"]
    p.add_argument("--quick", action="store_true", help=f"smoke-test sizes {SIZES['quick']}")
    p.add_argument("--ks", help=f"distances k (segments between the key and the question; full {full['ks']})")
    p.add_argument("--seeds", help=f"seeds: model init, texts, reservoir draws (full {full['seeds']})")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, help=f"AdamW steps per unit (full {full['steps']})")
    p.add_argument("--batch", type=int, help=f"texts per step (full {full['batch']})")
    p.add_argument("--eval-texts", type=int, help=f"held-out texts scored per unit (full {full['eval_texts']})")
    p.add_argument("--lr", type=float, help=f"peak lr: 5%% warm-up, cosine to 0 over --steps (full {full['lr']:g})")
    p.add_argument("--segment", type=int, default=Task.segment, help="L: tokens per segment")
    p.add_argument("--memories", type=int, default=2, help="M: memory tokens per segment")
    p.add_argument("--keep", type=int, default=2, help="k of the truncation: live encoder graphs")
    p.add_argument("--values", type=int, default=Task.values, help="distinct keys")
    p.add_argument("--distractors", type=int, default=Task.distractors, help="value tokens per earlier segment")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny ops: a second thread only waits)")
    p.add_argument("--out", default=str(RESULTS / "recall"))
    a = p.parse_args(argv)
    for key, value in SIZES["quick" if a.quick else "full"].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    try:
        a.ks = [int(x) for x in a.ks.split(",")]
        a.seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        p.error("--ks and --seeds are comma-separated integers")
    a.variants = [v for v in a.variants.split(",") if v]
    if not a.variants or any(v not in VARIANTS for v in a.variants):
        p.error(f"--variants: some of {', '.join(VARIANTS)}, got {','.join(a.variants) or 'none'}")
    if min(a.ks) < 1 or min(a.steps, a.batch, a.eval_texts, a.memories, a.keep, a.values) < 1:
        p.error("--ks, --steps, --batch, --eval-texts, --memories, --keep and --values must be >= 1")
    if a.segment < 4 + a.distractors or a.distractors < 0:
        p.error(f"--segment ({a.segment}) must hold BOS, MARK, the key, QUERY and --distractors ({a.distractors})")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        p.error("--lr must be positive")
    return a


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps (from lr / warm-up steps), then cosine to 0 at the last step run."""
    warmup = max(1, round(0.05 * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def accuracy(model: Transformer, uio: UIO | None, task: Task, ids: torch.Tensor, keys: torch.Tensor,
             k: int) -> tuple[float, float]:
    """(share of texts whose argmax after QUERY is the key, mean NLL of the key), read with the memories of
    segments 0 .. k-1 (none without UIO)."""
    L = task.segment
    memories = [encode(model, uio, ids[:, s * L:(s + 1) * L]) for s in range(k)] if uio else []
    hidden = decode(model, uio, memories, ids[:, k * L:(k + 1) * L])[:, -1:]              # (n, 1, dim)
    if uio:
        uio.use("base")
    logits = model.output(hidden)[:, 0].float()                                          # (n, vocab)
    nll = segment_nll(model, hidden, keys[:, None]).item() / len(keys)
    return (logits.argmax(-1) == keys).float().mean().item(), nll


def run_unit(a: argparse.Namespace, task: Task, variant: str, k: int, seed: int) -> dict:
    """Train a fresh tiny Llama (+ UIO unless no memory) on the task at distance k; score held-out texts."""
    model = tiny_llama(task, max(a.ks), a.memories, seed).train()
    uio = None
    if variant != "nomemory":
        uio = UIO(model, UIOConfig(segment=task.segment, memories=a.memories, rank=8, alpha=16.0, bptt=variant,
                                   keep=a.keep, memory_init=BOS, seed=seed, bos=BOS))
    params = list(model.parameters()) + ([uio.memory] if uio else [])  # the LoRAs are modules of the model now
    optimizer = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    losses, tic = [], time.perf_counter()
    for step in range(a.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr)
        ids, answer, _ = make_texts(task, k, a.batch, data)
        optimizer.zero_grad(set_to_none=True)
        if uio is None:  # segment k alone: what the base learns without any memory (the keys' prior)
            L = task.segment
            loss = segment_nll(model, decode(model, None, [], ids[:, k * L:(k + 1) * L]),
                               ids[:, k * L + 1:(k + 1) * L + 1], answer[:, k * L:]) / a.batch
            loss.backward()
            loss = loss.item()
        else:
            loss = text_gradient(model, uio, ids, rng, answer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not math.isfinite(loss):
            raise ValueError(f"{variant} k={k} seed {seed}: the loss at step {step} is not finite")
        optimizer.step()
        losses.append(loss)
    train_s = time.perf_counter() - tic
    model.eval()
    ids, _, keys = make_texts(task, k, a.eval_texts, torch.Generator().manual_seed(10_000 + seed))  # held out
    acc, nll = accuracy(model, uio, task, ids, keys, k)
    return {"accuracy": acc, "answer_nll": nll, "losses": losses, "train_s": train_s,
            "tokens_seen": a.steps * a.batch * (k + 1) * task.segment}


def unit_settings(a: argparse.Namespace, task: Task, variant: str, k: int, seed: int) -> dict:
    return {"variant": variant, "k": k, "seed": seed, "task": asdict(task), "steps": a.steps, "batch": a.batch,
            "eval_texts": a.eval_texts, "lr": a.lr, "memories": a.memories, "keep": a.keep,
            "model": "tiny Llama: dim 64, 2 layers, 4 heads on 2 KV heads, head_dim 16, SwiGLU 128",
            "uio": "LoRA r 8, alpha 16 (enc wq wv, dec wk wv); sink on, no layer-0 memory; base trained too",
            "schedule": "AdamW betas (0.9, 0.95), no weight decay, clip 1; 5% warm-up, cosine to 0 over the steps",
            "max_k": max(a.ks)}


def table(units: list[dict], ks: list[int], variants: list[str], keep: int) -> str:
    """Accuracy by variant and k: mean over seeds, and each seed's in brackets."""
    lines = ["| variant | " + " | ".join(f"k = {k}" + (" (within reach)" if k <= keep else "") for k in ks) + " |",
             "|---" * (len(ks) + 1) + "|"]
    for v in variants:
        cells = []
        for k in ks:
            accs = [u["accuracy"] for u in units if u["variant"] == v and u["k"] == k]
            cells.append(f"{sum(accs) / len(accs):.3f} ({', '.join(f'{x:.2f}' for x in accs)})" if accs else "")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(units: list[dict], ks: list[int], variants: list[str], chance: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        mean = [sum(u["accuracy"] for u in units if u["variant"] == v and u["k"] == k) /
                max(1, sum(1 for u in units if u["variant"] == v and u["k"] == k)) for k in ks]
        ax.plot(ks, mean, marker="o", label=v)
        ax.scatter([u["k"] for u in units if u["variant"] == v], [u["accuracy"] for u in units if u["variant"] == v],
                   s=10, alpha=0.5)
    ax.axhline(chance, color="gray", linestyle=":", label="chance")
    ax.set_xlabel("k: segments between the key and the question")
    ax.set_ylabel("recall accuracy (held-out texts)")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def run(a: argparse.Namespace) -> list[dict]:
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    task = Task(segment=a.segment, values=a.values, distractors=a.distractors)
    units = []
    for k in a.ks:
        for seed in a.seeds:
            for variant in a.variants:
                path = out / f"recall-{variant}-k{k}-seed{seed}.json"
                settings = unit_settings(a, task, variant, k, seed)
                r = stored(path, settings)
                if r is None:
                    r = settings | run_unit(a, task, variant, k, seed) | {"command": COMMAND}
                    write_json(path, r)
                    print(f"{variant} k={k} seed {seed}: accuracy {r['accuracy']:.3f}, answer NLL "
                          f"{r['answer_nll']:.3f}, {r['train_s']:.1f} s", file=sys.stderr, flush=True)
                units.append(r)
    summary = table(units, a.ks, a.variants, a.keep)
    write_json(out / "recall.json", {"units": [{key: u[key] for key in ("variant", "k", "seed", "accuracy",
                                                                          "answer_nll", "train_s", "tokens_seen")}
                                               for u in units], "chance": 1 / task.values,
                                     "settings": unit_settings(a, task, "*", 0, 0), "command": COMMAND})
    (out / "recall.md").write_text(summary + "\n")
    plot(units, a.ks, a.variants, 1 / task.values, out / "recall.png")
    print(summary)
    return units


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
