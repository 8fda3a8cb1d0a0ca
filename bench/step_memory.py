"""Memory of the adapter step against the window L_T + Δ: where it goes, and the peak of one step and of an eval.

    python -m bench.step_memory table [--tokens 4096] [--llama1b-tokens 1024,2048,4096]
    python -m bench.step_memory peak  [--tokens 1024,2048,4096,8192] [--impls lean,plain,peft,peft-gc]
                                      [--eval-tokens 2048,4096] [--out bench/results/step-memory]
    python -m bench.step_memory ... --quick      # a tiny random model: seconds (the tests run it)

table  the bytes autograd keeps for the backward of one step (torch.autograd.graph.saved_tensors_hooks, each
       storage counted once), by kind: logits and loss, norms, attention, feed-forward, adapters' inputs and
       masks; for the plain step (the model's forward under autograd: train_block.block_loss(lean=False)) and
       the lean one (the default: lean_backward.py). SmolLM2-135M at --tokens; Llama-3.2-1B's shapes with
       random weights at each --llama1b-tokens, measured on 2 of its layers (every layer keeps the same) and
       scaled to its 16. Nothing is trained.
peak   each point in a fresh process (peak RSS is a high-water mark): one adapter step on N tokens
       (L_T = 3N/4 context + Δ = N/4 block, rank 64 on all seven linears, dropout 0.05: the CLI's defaults at
       N = 4096), two steps, the second timed; implementations: lean (ours, default), plain (ours,
       block_loss(lean=False)), peft (transformers + peft, the official code's stack), peft-gc (the same with
       gradient checkpointing). And `templora.evaluate` of N + 1 tokens at the CLI's default knobs scaled to N
       (Δ = N/4, L_T = 3N/4, W = N, L_x = N/2), lean and plain. On the CPU the child's own ru_maxrss; on a
       GPU torch.cuda.max_memory_allocated. One JSON per point, written when it completes; a finished point
       is skipped, one with other settings refused; the table and plot show every point stored in --out.
       --dtype bfloat16 runs every point with bf16 weights and activations (the adapter stays fp32);
       --steps S takes S steps and reports the median of all but the first (default 2: the second).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from bench.common import BOOK, LLAMA_1B, MODEL_DIR, REPO, RESULTS, require_books, require_model
from cli import DTYPES
from protocol import write_json, write_text_atomic

KINDS = ("logits and loss", "norms", "attention", "feed-forward", "adapters' inputs and masks", "other")
IMPLS = ("lean", "plain", "peft", "peft-gc")
RANK, DROPOUT = 64, 0.05


def split(n: int) -> tuple[int, int]:
    """N tokens -> (L_T, Δ) = (3N/4, N/4): the CLI's defaults (3072, 1024) at N = 4096."""
    return n - n // 4, n // 4


# ----------------------------------------------------------------------------- the saved-tensor table

def saved_by_kind(model, ids: list[int], lean: bool) -> dict[str, int]:
    """Bytes autograd keeps for the backward of one block_loss, by kind (a storage kept twice counts once).
    The kind is the innermost module running when a tensor is kept; the lean block keeps its tensors
    itself, outside any module, and they are told apart by shape (see the module docstring of lean_backward)."""
    from lora import LoRALinear
    from model import Attention, FeedForward, RMSNorm
    from train_block import block_loss
    args = model.args
    stack, after_final_norm, seen = [], [False], {}
    by_type = {LoRALinear: "adapters' inputs and masks", RMSNorm: "norms", Attention: "attention",
               FeedForward: "feed-forward"}

    def kind_of(t: torch.Tensor) -> str:
        if after_final_norm[0] and not (stack and isinstance(stack[-1], RMSNorm)):
            return "logits and loss"
        for m in reversed(stack):
            if type(m) in by_type:
                return by_type[type(m)]
        if t.dtype == torch.uint8:                                           # the lean step's packed masks
            return "adapters' inputs and masks"
        if t.dim() >= 3 and t.shape[1] in (args.n_heads, args.n_kv_heads):   # q k v out (bs, heads, T, d), lse
            return "attention"
        if t.dim() == 2 and t.shape[-1] == args.head_dim:                    # RoPE cos, sin
            return "attention"
        if t.shape[-1] == args.hidden_dim:                                   # the gate and the up
            return "feed-forward"
        if t.shape[-1] == args.dim:                                          # x and h, for the two norms
            return "norms"
        return "other"

    def pack(t):
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), (kind_of(t), s.nbytes()))
        return t

    def enter(m, _):
        stack.append(m)

    def leave(m, _, __):
        stack.pop()

    def final_norm(m, _):
        after_final_norm[0] = True

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    handles.append(model.norm.register_forward_pre_hook(final_norm))
    context, block = split(len(ids))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = block_loss(model, ids[:context], ids[context:], lean=lean)
    finally:
        for h in handles:
            h.remove()
    del loss
    out = dict.fromkeys(KINDS, 0)
    for kind, nbytes in seen.values():
        out[kind] += nbytes
    return out


def adapted(model):
    from lora import add_lora
    model.requires_grad_(False)
    add_lora(model, RANK, float(RANK), DROPOUT, generator=torch.Generator().manual_seed(0))
    return model.train()


def table(a) -> dict:
    from load_llama import load_llama
    from model import ModelArgs, Transformer
    torch.set_num_threads(a.threads)
    rows = {}
    if a.quick:
        model = adapted(tiny(a))
        ids = list(range(1, 1 + a.tokens[0]))
        rows[f"tiny, {len(ids)} tokens"] = {"layers": model.args.n_layers, "scale": 1,
                                            **{f: saved_by_kind(model, ids, f == "lean") for f in ("plain", "lean")}}
        return rows
    model, tok = load_llama(a.model, "cpu", torch.float32)
    model = adapted(model)
    text = Path(a.text).read_text(encoding="utf-8")
    for n in a.tokens:
        ids = tok.encode(text[: 8 * n], bos=True)[:n]
        rows[f"SmolLM2-135M, {n} tokens"] = {"layers": model.args.n_layers, "scale": 1,
                                             **{f: saved_by_kind(model, ids, f == "lean") for f in ("plain", "lean")}}
    del model
    c = LLAMA_1B
    args = ModelArgs(dim=c["hidden_size"], n_layers=2, n_heads=c["num_attention_heads"],
                     n_kv_heads=c["num_key_value_heads"], head_dim=c["head_dim"], hidden_dim=c["intermediate_size"],
                     vocab_size=c["vocab_size"], rope_theta=c["rope_theta"], tie_embeddings=True)
    with torch.device("cpu"):
        model = adapted(Transformer(args))                          # nn.Linear's init: the values do not matter
    for n in a.llama1b_tokens:
        ids = torch.randint(0, args.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        measured = {f: saved_by_kind(model, ids, f == "lean") for f in ("plain", "lean")}
        # every layer keeps the same bytes: the 2 measured layers stand for all 16; the head's part is kept once
        scale = c["num_hidden_layers"] / args.n_layers
        rows[f"Llama-3.2-1B shapes, {n} tokens"] = {"layers": c["num_hidden_layers"], "scale": scale, **{
            f: {k: int(v if k == "logits and loss" else v * scale) for k, v in m.items()} for f, m in measured.items()}}
    return rows


def table_md(rows: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["| step | form | " + " | ".join(KINDS) + " | total MiB |", "|---|---|" + "---|" * (len(KINDS) + 1)]
    for name, r in rows.items():
        for form in ("plain", "lean"):
            lines.append(f"| {name} | {form} | " + " | ".join(mib(r[form][k]) for k in KINDS)
                         + f" | **{mib(sum(r[form].values()))}** |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- one point, in a child process

def tiny(a):
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=72, n_layers=2, n_heads=9, n_kv_heads=3, head_dim=8, hidden_dim=160,
                                 vocab_size=300, rope_theta=10000.0)).eval()


def one(a) -> dict:
    """One point; runs in its own process. Returns what the parent records."""
    from functools import partial as _partial

    from load_llama import load_llama
    from templora import TempLoRAConfig, evaluate
    from train_block import block_loss, make_optimizer, train_block
    from lora import lora_parameters
    torch.set_num_threads(a.threads)
    n = a.point_tokens
    if a.quick:
        model, ids = tiny(a).to(DTYPES[a.dtype]), [(7 * i + 3) % 300 for i in range(n + 1)]
    elif a.impl.startswith("peft"):
        model, ids = None, None
    else:
        model, tok = load_llama(a.model, a.device, DTYPES[a.dtype])
        ids = tok.encode(Path(a.text).read_text(encoding="utf-8")[: 8 * (n + 1)], bos=True)[: n + 1]
        if len(ids) < n + 1:
            raise SystemExit(f"--text {a.text}: fewer than {n + 1} tokens")
    context, delta = split(n)
    if a.what == "eval":
        loss_fn = block_loss if a.impl == "lean" else _partial(block_loss, lean=False)
        cfg = TempLoRAConfig(delta=delta, context=context, window=n, keep=n // 2)
        t = time.perf_counter()
        r = evaluate(model, ids, cfg, loss_fn=loss_fn)
        return {"wall_s": time.perf_counter() - t, "ppl_base": r["ppl_base"], "ppl_templora": r["ppl_templora"],
                "train_s": r["timings"]["train_s"], "blocks": len(r["chunks"])}
    if a.impl.startswith("peft"):
        return one_peft(a, n, context)
    model = adapted(model)
    opt = make_optimizer(lora_parameters(model), lr=1e-4)
    loss_fn = block_loss if a.impl == "lean" else _partial(block_loss, lean=False)
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        losses += train_block(model, opt, ids[:context], ids[context:n], 1e-4, epochs=1, loss_fn=loss_fn)
        times.append(time.perf_counter() - t)
    return step_times(times) | {"losses": losses}


def step_times(times: list[float]) -> dict:
    """The first step (first-call allocations, kernel choice) apart; step_s the median of the others."""
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "step_times_s": times[1:]}


def one_peft(a, n: int, context: int) -> dict:
    from transformers import LlamaForCausalLM

    from bench.templora_hf import add_peft_lora, make_optimizer_hf, train_hf
    from load_llama import load_tokenizer, read_json
    tok = load_tokenizer(Path(a.model), read_json(Path(a.model) / "config.json"))
    ids = tok.encode(Path(a.text).read_text(encoding="utf-8")[: 8 * (n + 1)], bos=True)[:n]
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=DTYPES[a.dtype]).to(a.device)
    if a.impl == "peft-gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = add_peft_lora(model, RANK, float(RANK), DROPOUT)
    opt = make_optimizer_hf(peft_model, 1e-4)
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        losses += train_hf(peft_model, opt, ids, context, n, context, 1e-4, epochs=1)
        times.append(time.perf_counter() - t)
    return step_times(times) | {"losses": losses}


# ----------------------------------------------------------------------------- the sweep

def settings(a) -> dict:
    s = {"model": Path(a.model).name, "text": Path(a.text).name, "threads": a.threads, "device": a.device,
         "rank": RANK, "dropout": DROPOUT, "dtype": a.dtype, "quick": a.quick}
    if a.steps != 2:  # points stored before --steps existed took 2 steps and do not say so
        s["steps"] = a.steps
    return s


def peak(a, log) -> dict:
    from bench.memory import run_child
    out = Path(a.out)
    points = [("step", impl, n) for n in a.tokens for impl in a.impls]
    points += [("eval", impl, n) for n in a.eval_tokens for impl in ("lean", "plain")]
    results = {}
    for what, impl, n in points:
        path = out / f"{what}-{impl}-{n}.json"
        if path.exists():
            r = json.loads(path.read_text())
            if r["settings"] != settings(a):
                raise SystemExit(f"{path} was measured with other settings ({r['settings']}); "
                                 "pass another --out or delete it")
            results[path.stem] = r
            log(f"{path.stem}: done before, kept")
            continue
        cmd = [sys.executable, "-m", "bench.step_memory", "one", "--what", what, "--impl", impl,
               "--point-tokens", str(n), "--model", str(a.model), "--text", str(a.text), "--threads",
               str(a.threads), "--device", a.device, "--dtype", a.dtype, "--steps", str(a.steps)] + \
            (["--quick"] if a.quick else [])
        log(f"{path.stem}")
        child = run_child(cmd, log)
        r = json.loads(child["output_tail"])
        r |= {"what": what, "impl": impl, "tokens": n, "peak_rss_mib": child["peak_rss_mib"],
              "context": split(n)[0], "delta": split(n)[1], "settings": settings(a)}
        write_json(path, r)
        results[path.stem] = r
        log(f"  peak RSS {r['peak_rss_mib']:,.0f} MiB" + (f", step {r['step_s']:.1f}s" if "step_s" in r else ""))
    for path in sorted(out.glob("*-*-*.json")):  # the table and plot show every point stored here, not only this run's
        r = json.loads(path.read_text())
        if path.stem not in results and r.get("settings") == settings(a) and r.get("impl") in IMPLS:
            results[path.stem] = r
    return results


def peak_md(results: dict) -> str:
    lines = ["| what | tokens (L_T + Δ) | implementation | peak RSS MiB | time s |", "|---|---|---|---|---|"]
    for r in sorted(results.values(), key=lambda r: (r["what"], r["tokens"], IMPLS.index(r["impl"]))):
        t = r["step_s"] if r["what"] == "step" else r["wall_s"]
        lines.append(f"| {r['what']} | {r['tokens']} ({r['context']} + {r['delta']}) | {r['impl']} | "
                     f"{r['peak_rss_mib']:,.0f} | {t:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for what in ("step", "eval"):
        for impl in IMPLS:
            pts = sorted((r["tokens"], r["peak_rss_mib"] / 1024) for r in results.values()
                         if r["what"] == what and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o" if what == "step" else "s", linestyle="-" if what == "step" else "--",
                        label=f"{what}: {impl}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L_T + Δ (tokens)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("one adapter step / one eval, fresh process each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["table", "peak", "one"])
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--text", default=str(BOOK))
    p.add_argument("--tokens", type=ints, default=None, help="table: SmolLM2 lengths (4096); peak: step lengths")
    p.add_argument("--llama1b-tokens", type=ints, default=[1024, 2048, 4096])
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--eval-tokens", type=ints, default=[2048, 4096])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS / "step-memory"))
    p.add_argument("--quick", action="store_true", help="a tiny random model, seconds")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="peak: weights and activations")
    p.add_argument("--steps", type=int, default=2, help="peak: steps per point, the first untimed (at least 2)")
    p.add_argument("--what", choices=["step", "eval"], default="step", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, default="lean", help=argparse.SUPPRESS)
    p.add_argument("--point-tokens", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.impls = [x.strip() for x in a.impls.split(",") if x.strip()]
    bad = [x for x in a.impls if x not in IMPLS]
    if bad:
        p.error(f"--impls: unknown {', '.join(bad)} (choose from {', '.join(IMPLS)})")
    if a.tokens is None:
        a.tokens = [4096] if a.command == "table" else [1024, 2048, 4096, 8192]
    if a.quick:
        a.tokens, a.llama1b_tokens, a.eval_tokens = [96], [], [64]
        a.impls = [x for x in a.impls if not x.startswith("peft")]
    if any(n < 8 or n % 4 for n in a.tokens + a.eval_tokens + a.llama1b_tokens):
        p.error("--tokens, --eval-tokens, --llama1b-tokens: multiples of 4, at least 8")
    if a.steps < 2:
        p.error("--steps: at least 2 (the first is not timed)")
    if a.command == "table" and a.dtype != "float32":
        p.error("--dtype: the table counts float32 bytes; bfloat16 is for peak")
    if a.device != "cpu" and a.command == "peak":
        p.error("--device: the peak sweep measures CPU RSS; run `table` or bench.speed on a GPU")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.command == "one":
        print(json.dumps(one(a)))
        return 0
    if not a.quick:
        require_model(a.model)
        require_books(a.text, "--text")

    def log(s):
        print(s, file=sys.stderr, flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.command == "table":
        rows = table(a)
        write_json(out / "saved-tensors.json", {"settings": settings(a), "rows": rows})
        md = table_md(rows)
        write_text_atomic(out / "saved-tensors.md", md)
        print(md)
        return 0
    results = peak(a, log)
    md = peak_md(results)
    write_text_atomic(out / "peak.md", md)
    plot(results, out / "peak.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
