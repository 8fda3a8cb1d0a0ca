"""Speed of templora against transformers (+ peft for the adapter), the stack of the official Temp-LoRA code:
same model, dtype, tokens and thread count, each stack in a process of its own, timed in turns; and against
this machine's matmul peak. Dev dependencies (requirements-dev.txt).

    python -m bench.speed [--model smollm2|llama1b|both] [--repeats 5] [--quick] [--one-process]
                          [--out bench/results/speed.json]

Each stack (ours, theirs) is loaded by a spawned process of its own, and the benchmarks alternate between the
two processes: each allocates and frees in its own heap, as it would run alone, with its peak RSS reported.
--one-process loads both here (how the results with no "processes" key were timed): a step then starts in
a heap the other stack has just freed, and whoever hands freed pages back to the system (our step's
malloc_trim, lean_backward.trim_heap) makes the other fault them in again, so the ratios depend on the order.

What is timed (each pair alternates ours / theirs, one warm-up each, then --repeats runs; medians):
  prefill  a no-grad forward of --seq tokens that fills a KV cache, logits of the last position only
           (what generation does first). Ours: model(ids, 0, KVCache, last=1). Theirs: model(ids,
           logits_to_keep=1), its DynamicCache.
  decode   greedy decoding, batch 1, --new-tokens tokens after a --prompt-tokens prompt, prefill included,
           eos never stops either. Ours: model.generate with a KVCache. Theirs: model.generate(do_sample=False).
  step     one Temp-LoRA adapter step on a --seq window (context + block, loss on the block only): forward,
           backward, clip 1.0, AdamW; rank 64 on q,k,v,o,gate,up,down. Ours: train_block + make_optimizer, its
           lean step (--step-form plain: the model's forward under autograd). Theirs: peft LoraConfig on
           LlamaForCausalLM, labels -100 on the context.
  block    one Temp-LoRA eval block end to end: score base, score adapter, train --epochs steps. Ours:
           templora.eval_block, the block of templora.evaluate, on two fresh Windows. Theirs:
           bench/templora_hf.py (disable_adapter(), full forwards of context + block, like the official code).
  peak     large square torch.matmul in float32 and bfloat16: prefill and step are also reported as a
           fraction of the peak of their dtype (model FLOPs, formulas in bench/flops.py);
           and the read bandwidth of a large tensor sum, the limit of decoding (weight bytes per token).

Models: the real SmolLM2-135M (--smollm2-dir) and a random checkpoint with Llama-3.2-1B's shapes, written
once per run to a temporary directory with save_pretrained (bf16) and loaded by both from there.
"""
import argparse
import gc
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from bench.common import BOOK, LLAMA_1B, MODEL_DIR, RESULTS, path_label, require_books, require_model
from bench.flops import prefill_flops, step_flops
from bench.templora_hf import add_peft_lora, eval_block_hf, make_optimizer_hf, train_hf
from load_llama import load_model, load_tokenizer, read_json
from lora import add_lora, lora_parameters, remove_lora
from model import KVCache, ModelArgs, generate
from protocol import Window, write_json
from cli import DTYPES
from templora import TempLoRAConfig, eval_block
from train_block import block_loss, make_optimizer, train_block

# --model tiny: the 1B's layout at a size the tests run in seconds
TINY = LLAMA_1B | dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)

# ratio ours / theirs wanted for each benchmark; the adapter step on the 1B model should reach half the bf16 peak
TARGETS = {"prefill": 1.0, "decode": 1.5, "step": 1.5, "block": 2.0}
STEP_PEAK_TARGET = {"llama1b": 0.5}

# FLOPs are model FLOPs (the useful work), from bench/flops.py: the work of a task is counted once and used
# for both implementations, so work one of them wastes (e.g. transformers' logits on context positions that
# carry no loss) is not counted, and the two fractions of peak compare like the two speeds.


# ----------------------------------------------------------------------------- timing

def timed(run, setup=None) -> tuple[float, object]:
    """Seconds taken by run(setup()), setup excluded; garbage collected first so that a collection
    triggered by the other implementation's garbage does not land inside this run."""
    state = setup() if setup else None
    gc.collect()
    t = time.perf_counter()
    out = run(state)
    return time.perf_counter() - t, out


def alternate(stacks: dict, bench: str, repeats: int, log) -> dict:
    """Time stacks["ours"] and stacks["theirs"] on one benchmark in turns: one warm-up each (first-call
    allocations, oneDNN kernel selection), then `repeats` rounds with the order swapped every round so
    that drift (other load, clocks) falls on both alike."""
    times = {"ours": [], "theirs": []}
    outs = {}
    for name in ("ours", "theirs"):
        secs, outs[name] = stacks[name].run(bench)
        log(f"    warm-up {name}: {secs:.3f}s")
    for r in range(repeats):
        for name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            secs, outs[name] = stacks[name].run(bench)
            times[name].append(secs)
        log(f"    round {r + 1}/{repeats}: ours {times['ours'][-1]:.3f}s  theirs {times['theirs'][-1]:.3f}s")
    return {"ours_s": times["ours"], "theirs_s": times["theirs"],
            "ours_median_s": statistics.median(times["ours"]),
            "theirs_median_s": statistics.median(times["theirs"]), "outputs": outs}


def matmul_peak(dtype: torch.dtype, n: int, repeats: int) -> dict:
    """Best FLOP/s of (n, n) @ (n, n): the machine's practical limit for this dtype and thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = min(timed(lambda _: torch.matmul(a, b))[0] for _ in range(max(3, repeats)))
    return {"n": n, "best_s": best, "flops_per_s": 2 * n ** 3 / best}


def read_bandwidth(nbytes: int, repeats: int) -> dict:
    """Best bytes/s of summing a large bf16 tensor: the limit of batch-1 decoding, which reads every
    weight once per token and does little arithmetic on it (not one of the targets; context for decode)."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    x.sum()
    best = min(timed(lambda _: x.sum())[0] for _ in range(max(3, repeats)))
    return {"bytes": nbytes, "best_s": best, "bytes_per_s": nbytes / best}


# ----------------------------------------------------------------------------- the two stacks

def prepare(name: str, a: argparse.Namespace, tmp: str, log) -> tuple[Path, list[int], str]:
    """(checkpoint directory, token ids, description) of one model, which both stacks load."""
    n_ids = max(a.seq, a.prompt_tokens)
    if name == "smollm2":
        ckpt = Path(a.smollm2_dir)
        tok = load_tokenizer(ckpt, read_json(ckpt / "config.json"))
        text = Path(a.book).read_text(encoding="utf-8")[: 40 * n_ids]  # ~4 characters a token: plenty
        ids = tok.encode(text, bos=True)[:n_ids]
        if len(ids) < n_ids:
            raise ValueError(f"{a.book}: only {len(ids)} tokens, {n_ids} needed")
        return ckpt, ids, f"SmolLM2-135M-Instruct ({path_label(ckpt)}), tokens of {Path(a.book).name}"
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**(LLAMA_1B | {"num_hidden_layers": a.llama1b_layers} if name == "llama1b" else TINY))
    ckpt = Path(tmp) / f"{name}-random"
    t = time.perf_counter()
    torch.manual_seed(0)
    # HF's own init (normal, std 0.02) in bf16; the values do not matter for speed
    LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).save_pretrained(ckpt)
    gc.collect()
    shapes = f"Llama-3.2-1B shapes ({a.llama1b_layers} layers)" if name == "llama1b" else "a tiny Llama (the tests')"
    log(f"  wrote a random checkpoint of {shapes} in {time.perf_counter() - t:.0f}s")
    ids = torch.randint(0, cfg.vocab_size, (n_ids,), generator=torch.Generator().manual_seed(0)).tolist()
    return ckpt, ids, f"random weights, {shapes}, random token ids"


class Stack:
    """One implementation ("ours" or "theirs") of one model, loaded once from `ckpt`: run(bench) times
    one call of a benchmark on it. The adapter is added before the first adapter benchmark (seed 0),
    with the same rank, alpha and dropout on both."""

    def __init__(self, who: str, ckpt, ids: list[int], a: argparse.Namespace):
        self.who, self.ids, self.a = who, ids, a
        dtype = DTYPES[a.dtype]
        if who == "ours":
            self.model = load_model(ckpt, dtype=dtype)
        else:
            from transformers import LlamaForCausalLM
            # left as transformers loads it, parameters requiring grad. Frozen, its lm_head on the sliced hidden
            # state of logits_to_keep=1 goes through a bmm that copies the whole weight (torch 2.13: 3.2 s instead
            # of 0.06 s for a Llama-1B-sized head); peft freezes it later, for the adapter benchmarks, whose
            # logits are not sliced
            self.model = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
            self.model.generation_config.eos_token_id = None  # no eos stopping, no logits processor on the argmax
        self.adapted = None  # ours: the model with add_lora; theirs: the peft model
        self.calls = {}      # bench -> (run, setup)

    def describe(self) -> dict:
        """What the FLOP and bandwidth figures need: our ModelArgs and the weight bytes a decoded token reads."""
        return {"args": asdict(self.model.args), "weight_bytes": sum(
            {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}.values())}

    def run(self, bench: str) -> tuple[float, object]:
        if bench not in self.calls:
            self.calls[bench] = (our_call if self.who == "ours" else their_call)(self, bench)
        return timed(*self.calls[bench])

    def adapter(self):
        if self.adapted is None:
            torch.manual_seed(0)
            a = self.a
            if self.who == "ours":
                add_lora(self.model, a.rank, a.alpha, a.dropout)
                self.adapted = self.model
            else:
                self.adapted = add_peft_lora(self.model, a.rank, a.alpha, a.dropout)
        return self.adapted

    def close(self) -> float | None:
        """Take the adapter off; None (the peak RSS of a process of its own, from Remote.close)."""
        if self.who == "ours":
            remove_lora(self.model)  # nothing to do without an adapter
        elif self.adapted is not None:
            self.adapted.unload()
        self.adapted = None
        return None


def our_call(stack: Stack, bench: str):
    """(run, setup) of one benchmark on our stack: see the module's docstring."""
    a, ids, model = stack.a, stack.ids, stack.model
    if bench == "prefill":
        tokens = torch.tensor([ids[: a.seq]])  # (1, seq)

        def run(cache):
            with torch.no_grad():
                return model(tokens, 0, cache, last=1)
        # our cache is allocated once per window in real use, so outside the timed region
        return run, lambda: KVCache(model.args, 1, a.seq, dtype=DTYPES[a.dtype])
    if bench == "decode":
        prompt = ids[: a.prompt_tokens]
        # no stop ids: exactly new_tokens tokens
        return (lambda cache: generate(model, cache, prompt, 0, a.new_tokens),
                lambda: KVCache(model.args, 1, len(prompt) + a.new_tokens, dtype=DTYPES[a.dtype]))
    loss_fn = partial(block_loss, lean=a.step_form == "lean")
    opt = make_optimizer(lora_parameters(stack.adapter()), a.lr)
    if bench == "step":
        return lambda _: train_block(model, opt, ids[: a.context], ids[a.context: a.seq], a.lr, epochs=1,
                                     loss_fn=loss_fn), None
    # block: the window is context + block and starts empty, so our scoring is a forward of the context and
    # the block, the same work as the official full forward (in the eval loop with W = L_T + Δ and L_x = L_T
    # every block is such a recompute; a larger W lets ours reuse the cache and do less)
    cfg = TempLoRAConfig(delta=a.seq - a.context, context=a.context, window=a.seq, keep=a.context, epochs=a.epochs)
    return (lambda windows: eval_block(model, ids, a.context, a.seq, *windows, opt, a.lr, cfg, loss_fn=loss_fn),
            lambda: (Window(model, a.seq, a.context), Window(model, a.seq, a.context)))


def their_call(stack: Stack, bench: str):
    """(run, setup) of one benchmark on transformers (+ peft)."""
    a, ids, model = stack.a, stack.ids, stack.model
    if bench == "prefill":
        tokens = torch.tensor([ids[: a.seq]])

        def run(_):  # its DynamicCache is built inside its forward, as it always is
            with torch.no_grad():
                return model(tokens, use_cache=True, logits_to_keep=1).logits
        return run, None
    if bench == "decode":
        prompt, n = ids[: a.prompt_tokens], a.new_tokens

        def run(_):
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
            return out[0, len(prompt):].tolist()
        return run, None
    peft_model = stack.adapter()
    opt = make_optimizer_hf(peft_model, a.lr)
    if bench == "step":
        return lambda _: train_hf(peft_model, opt, ids, a.context, a.seq, a.context, a.lr, epochs=1), None
    return lambda _: eval_block_hf(peft_model, opt, ids, a.context, a.seq, a.context, a.lr, a.epochs), None


def quiet():
    import transformers
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside peft/transformers


def serve(who: str, ckpt: str, ids: list[int], a: argparse.Namespace, conn) -> None:
    """A Stack in a process of its own: answers ("run", bench) and ("describe",) over the pipe until None,
    then sends its peak RSS. An error is sent back as ("error", its traceback)."""
    try:
        torch.set_num_threads(a.threads)
        if who == "theirs":  # ours never imports transformers: its peak RSS is its own
            quiet()
        stack = Stack(who, ckpt, ids, a)
        conn.send("ready")
        while (request := conn.recv()) is not None:
            conn.send(getattr(stack, request[0])(*request[1:]))
        stack.close()
        conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux -> MiB
    except Exception:
        conn.send(("error", traceback.format_exc()))


class Remote:
    """A Stack served by a spawned process of its own: each implementation allocates and frees in a heap of
    its own, as it does when run alone. In one process, a step runs in the heap the other just freed, and
    our step's malloc_trim hands back pages the other then faults in again (1 µs a 4 KiB page here)."""

    def __init__(self, who: str, ckpt, ids: list[int], a: argparse.Namespace):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(who, str(ckpt), ids, a, child), daemon=True)
        self.proc.start()
        child.close()  # the child's end lives in the child: a child that dies ends recv() with EOFError
        self.ask()  # "ready" once loaded

    def ask(self, *request):
        if request:
            self.conn.send(request)
        try:
            answer = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"the {self.proc.name} process ended (exit code {self.proc.exitcode})") from None
        if isinstance(answer, tuple) and answer[:1] == ("error",):
            raise RuntimeError(f"the {self.proc.name} process failed:\n{answer[1]}")
        return answer

    def describe(self) -> dict:
        return self.ask("describe")

    def run(self, bench: str) -> tuple[float, object]:
        return self.ask("run", bench)

    def close(self) -> float | None:
        """Peak RSS of the process in MiB (loading, every benchmark), once it has ended; None if it had
        already ended on an error (which its run() raised)."""
        try:
            self.conn.send(None)
            rss = self.ask()
        except (BrokenPipeError, RuntimeError):
            rss = None
        self.proc.join()
        return rss


# ----------------------------------------------------------------------------- the benchmarks

def summarize(bench: str, r: dict, info: dict, a: argparse.Namespace) -> dict:
    """The timings of one benchmark, its checks (the two agree where they must) and its work."""
    lo, lt = r.pop("outputs").values()
    if bench == "prefill":
        r["max_abs_logit_diff"] = (lo.float() - lt.float()).abs().max().item()
        r["tokens"] = a.seq
        r["flops"] = prefill_flops(ModelArgs(**info["args"]), a.seq)
    elif bench == "decode":
        n = a.new_tokens
        if len(lo) != n or len(lt) != n:
            raise RuntimeError(f"decode produced {len(lo)} (ours) and {len(lt)} (theirs) tokens, not {n}")
        r["tokens"] = n
        # each new token reads every weight once (the tied head reads the embedding matrix once more than
        # the lookup, which reads one row): the bytes a decode step cannot avoid, KV cache aside. The fraction
        # of bandwidth counts them for n tokens over the whole timed call, prompt prefill included (an underestimate)
        r["bytes_per_token"] = info["weight_bytes"]
        r["same_tokens"] = lo == lt
        r["first_difference"] = next((i for i, (x, y) in enumerate(zip(lo, lt)) if x != y), None)
    elif bench == "step":
        r["loss_last"] = {"ours": lo[-1], "theirs": lt[-1]}
        r["tokens"] = a.seq
        r["flops"] = step_flops(ModelArgs(**info["args"]), a.seq, a.seq - a.context, a.rank)
    else:
        # the base scores of the two must agree (same weights, same tokens); the adapters differ (random init, dropout)
        n = a.seq - a.context
        r["base_nll_per_token"] = {"ours": lo["nll_base"] / n, "theirs": lt["nll_base"] / n}
        r["tokens"] = n
    return r


LABELS = {"prefill": "prefill {seq} tokens", "decode": "decode {new_tokens} tokens after {prompt_tokens}",
          "step": "adapter step on {context} + {block} tokens",
          "block": "eval block: {context} context + {block} block tokens, {epochs} epochs"}


def run_model(name: str, a: argparse.Namespace, peaks: dict, log) -> dict:
    """Every benchmark of --bench on one model: both stacks loaded from the same directory, each in a
    process of its own (Remote) or, with --one-process, both in this one."""
    make = Stack if a.one_process else Remote
    stacks = {}
    try:
        with tempfile.TemporaryDirectory(prefix="templora-bench-") as tmp:
            t = time.perf_counter()
            ckpt, ids, what = prepare(name, a, tmp, log)
            for who in ("ours", "theirs"):
                stacks[who] = make(who, ckpt, ids, a)
        log(f"  loaded both in {time.perf_counter() - t:.0f}s "
            f"({'one process' if a.one_process else 'a process each'}): {what}")
        info = stacks["ours"].describe()
        out = {"model": what, "args": info["args"], "processes": "one" if a.one_process else "one per stack"}
        for bench in ("prefill", "decode", "step", "block"):
            if bench in a.bench:
                log("  " + LABELS[bench].format(block=a.seq - a.context, **vars(a)))
                out[bench] = summarize(bench, alternate(stacks, bench, a.repeats, log), info, a)
    finally:
        rss = {who: stack.close() for who, stack in stacks.items()}
    if not a.one_process:
        out["peak_rss_mib"] = rss  # each process's whole life: loading and every benchmark above
        log(f"  peak RSS: ours {rss['ours']:.0f} MiB, theirs {rss['theirs']:.0f} MiB")
    for key, r in out.items():
        if isinstance(r, dict) and "ours_median_s" in r:
            r["ours_tokens_per_s"] = r["tokens"] / r["ours_median_s"]
            r["theirs_tokens_per_s"] = r["tokens"] / r["theirs_median_s"]
            r["ratio"] = r["theirs_median_s"] / r["ours_median_s"]  # > 1: ours is faster
            if "flops" in r and a.dtype in peaks:
                peak = peaks[a.dtype]["flops_per_s"]
                r["ours_fraction_of_peak"] = r["flops"] / r["ours_median_s"] / peak
                r["theirs_fraction_of_peak"] = r["flops"] / r["theirs_median_s"] / peak
            if "bytes_per_token" in r and "memory_read" in peaks:
                for who in ("ours", "theirs"):
                    r[f"{who}_memory_read_fraction"] = (r["tokens"] * r["bytes_per_token"] / r[f"{who}_median_s"]
                                                        / peaks["memory_read"]["bytes_per_s"])
    del stacks
    gc.collect()
    return out


# ----------------------------------------------------------------------------- report

def table(name: str, r: dict, a: argparse.Namespace) -> str:
    rows = ["| benchmark | ours | transformers(+peft) | ratio | target | met? |", "|---|---|---|---|---|---|"]
    labels = {"prefill": f"prefill {a.seq} tok, tok/s", "decode": f"decode {a.new_tokens} tok, batch 1, tok/s",
              "step": f"adapter step {a.seq} tok (r={a.rank}), tok/s",
              "block": f"eval block end to end ({a.seq - a.context} scored tok), tok/s"}
    for key, label in labels.items():
        if key in r:
            x = r[key]
            met = "yes" if x["ratio"] >= TARGETS[key] else "no"
            rows.append(f"| {label} | {x['ours_tokens_per_s']:.1f} | {x['theirs_tokens_per_s']:.1f} | "
                        f"{x['ratio']:.2f}x | ≥{TARGETS[key]:.1f}x | {met} |")
    if "decode" in r and "ours_memory_read_fraction" in r["decode"]:
        x = r["decode"]
        rows.append(f"| decode, weight bytes/s as % of memory read bandwidth | "
                    f"{100 * x['ours_memory_read_fraction']:.1f}% | "
                    f"{100 * x['theirs_memory_read_fraction']:.1f}% | | | |")
    for key in ("prefill", "step"):
        if key in r and "ours_fraction_of_peak" in r[key]:
            x = r[key]
            target, met = STEP_PEAK_TARGET.get(name) if key == "step" else None, ""
            if target is not None and a.dtype == "bfloat16":
                met = "yes" if x["ours_fraction_of_peak"] >= target else "no"
                target = f"≥{100 * target:.0f}%"
            else:
                target = ""
            gflops = {w: x["flops"] / x[f"{w}_median_s"] / 1e9 for w in ("ours", "theirs")}
            rows.append(f"| {key}, model FLOP/s as % of {a.dtype} matmul peak | "
                        f"{100 * x['ours_fraction_of_peak']:.1f}% ({gflops['ours']:.0f} GFLOP/s) | "
                        f"{100 * x['theirs_fraction_of_peak']:.1f}% ({gflops['theirs']:.0f} GFLOP/s) | "
                        f"| {target} | {met} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "llama1b", "both", "tiny"], default=None,
                   help="default: both, SmolLM2 and the 1B shapes (--quick: smollm2); tiny: random, for the tests")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per benchmark (default 5, --quick 2)")
    p.add_argument("--quick", action="store_true", help="smollm2, short sequences, 2 rounds: about 2 minutes")
    p.add_argument("--out", default=str(RESULTS / "speed.json"))
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                   help="base weights; both store the adapter in float32 (ours multiplies it in this dtype, "
                        "peft in float32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for both")
    p.add_argument("--bench", default="peak,prefill,decode,step,block", help="comma-separated subset")
    p.add_argument("--seq", type=int, default=None,
                   help="prefill length and adapter window (default 2048, --quick 512)")
    p.add_argument("--context", type=int, default=None, help="context part of the window (default --seq / 2)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="decode prompt length")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 256, --quick 64)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=2, help="adapter steps per eval block")
    p.add_argument("--one-process", action="store_true",
                   help="both stacks in this process, as before (default: each in a spawned process of its own, so "
                        "neither runs in the heap the other has just freed)")
    p.add_argument("--step-form", choices=["lean", "plain"], default="lean",
                   help="our adapter step in step and block: lean (train_block's default, lean_backward.py) or "
                        "plain (the model's forward under autograd), to time both on one machine")
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 4096, --quick 2048)")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="tensor read for the bandwidth (default 2048, --quick 512)")
    p.add_argument("--smollm2-dir", default=str(MODEL_DIR))
    p.add_argument("--book", default=str(BOOK), help="text whose tokens feed SmolLM2")
    p.add_argument("--llama1b-layers", type=int, default=16, help="fewer layers for a fast check of the 1B shapes")
    a = p.parse_args(argv)
    quick = a.quick
    a.model = a.model or ("smollm2" if quick else "both")
    a.repeats = a.repeats or (2 if quick else 5)
    a.seq = a.seq or (512 if quick else 2048)
    a.context = a.seq // 2 if a.context is None else a.context
    a.new_tokens = a.new_tokens or (64 if quick else 256)
    a.peak_size = a.peak_size or (2048 if quick else 4096)
    a.bandwidth_mib = a.bandwidth_mib or (512 if quick else 2048)
    a.bench = [b.strip() for b in a.bench.split(",") if b.strip()]
    unknown = set(a.bench) - {"peak", "prefill", "decode", "step", "block"}
    if unknown:
        p.error(f"unknown --bench {sorted(unknown)}")
    if not 0 < a.context < a.seq:
        p.error(f"--context ({a.context}) must be between 0 and --seq ({a.seq})")
    return a


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.model in ("smollm2", "both"):  # the random 1B model needs neither
        require_model(a.smollm2_dir, "--smollm2-dir")
        require_books(a.book, "--book")
    import peft
    import transformers
    quiet()
    torch.set_num_threads(a.threads)

    def log(s):
        print(s, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "peft": peft.__version__,
                          "bf16_matmul_supported": torch.ops.mkldnn._is_mkldnn_bf16_supported()},
              "config": vars(a) | {"book": path_label(a.book), "smollm2_dir": path_label(a.smollm2_dir)},
              "peak": {}, "models": {}}
    if "peak" in a.bench:
        for dt in ("float32", "bfloat16"):
            result["peak"][dt] = matmul_peak(DTYPES[dt], a.peak_size, a.repeats)
            log(f"matmul peak {dt}: {result['peak'][dt]['flops_per_s'] / 1e9:.0f} GFLOP/s (n={a.peak_size})")
        result["peak"]["memory_read"] = read_bandwidth(a.bandwidth_mib << 20, a.repeats)
        log(f"memory read: {result['peak']['memory_read']['bytes_per_s'] / 2**30:.1f} GiB/s")
    for name in (["smollm2", "llama1b"] if a.model == "both" else [a.model]):
        log(f"== {name}")
        result["models"][name] = run_model(name, a, result["peak"], log)
    result["total_s"] = time.perf_counter() - t0

    print(f"# templora vs transformers(+peft): {a.dtype}, {a.threads} threads, {a.repeats} rounds, medians; "
          f"{result['machine']['cpu']}")
    if result["peak"]:
        peaks = ", ".join(f"{dt} {result['peak'][dt]['flops_per_s'] / 1e9:.0f} GFLOP/s" for dt in DTYPES)
        read = result["peak"]["memory_read"]["bytes_per_s"] / 2 ** 30
        print(f"matmul peak: {peaks} (n={a.peak_size}); memory read {read:.1f} GiB/s")
    for name, r in result["models"].items():
        print(f"\n## {name}: {r['model']}\n")
        print(table(name, r, a))
        notes = []
        if "prefill" in r:
            notes.append(f"prefill max |Δlogit| {r['prefill']['max_abs_logit_diff']:.2e}")
        if "decode" in r:
            d = r["decode"]
            notes.append("decode tokens identical" if d["same_tokens"]
                         else f"decode tokens differ from #{d['first_difference']}")
        if "block" in r:
            b = r["block"]["base_nll_per_token"]
            notes.append(f"block base NLL/token ours {b['ours']:.4f} theirs {b['theirs']:.4f}")
        if notes:
            print("\n" + "; ".join(notes))
    print(f"\ntotal {result['total_s']:.0f}s")
    write_json(a.out, result, default=str)
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
