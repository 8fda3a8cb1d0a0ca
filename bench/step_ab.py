"""The adapter step of two checkouts of this project, timed against each other where whole runs drift by 20%.

    python -m bench.step_ab A_DIR B_DIR [--rounds 8] [--tokens 2048] [--dtype bfloat16] [--threads 2]
                            [--model DIR] [--text BOOK] [--out FILE.json]
    python -m bench.step_ab A_DIR B_DIR --quick      # a tiny random model: seconds (the tests run it)

Two persistent processes, one per checkout, each importing that checkout's own load_llama, lora and
train_block, load the same model and the same tokens and take one Temp-LoRA adapter step each in turn, the
order swapped every round, after one warm-up step each: train_block(epochs=1) on the first half of --tokens
as context and the second half as the block, rank 64 on all seven linears, dropout 0.05, AdamW. Whatever slows
the machine for a while slows both alike, so the per-round ratio A / B is steadier than either time: its median
and the rounds in which A was faster are the result, beside each process's peak RSS after loading and after
the steps.

The checkouts can be this repository and a `git worktree add DIR COMMIT` of an older commit, as far back as
these functions keep their signatures: load_model(dir, dtype=), load_tokenizer(dir, read_json(config)),
add_lora(model, rank=, alpha=, dropout=), lora_parameters(model), make_optimizer(params, lr),
train_block(model, optimizer, context, block, lr, epochs=).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# nothing of this project is imported at the top: the same file serves each checkout (serve), in a process
# that must import that checkout's modules and no others
NEEDED = ("load_llama.py", "lora.py", "train_block.py", "model.py")  # the files a checkout must have
HERE = Path(__file__).resolve().parent                              # bench/ of the repository running this


def serve(checkout: str, settings: dict) -> None:
    """The child: `python bench/step_ab.py --serve CHECKOUT SETTINGS`. Loads the model with the checkout's own
    modules, then answers each "step" line on stdin with one JSON line: one step's seconds and the peak RSS
    so far. Its stdout carries those lines alone: whatever the checkout prints goes to stderr."""
    to_parent = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    tell = lambda msg: print(json.dumps(msg), file=to_parent, flush=True)  # noqa: E731
    # the checkout first, and nothing of the repository this file belongs to
    sys.path[:] = [checkout] + [p for p in sys.path if Path(p or ".").resolve() not in (HERE, HERE.parent)]
    a = argparse.Namespace(**settings)
    try:
        import torch
        import lora
        import train_block as tb
        from lora import add_lora, lora_parameters
        from train_block import make_optimizer, train_block
        for module in (lora, tb):
            if not Path(module.__file__).resolve().is_relative_to(checkout):
                raise ImportError(f"{module.__name__} came from {module.__file__}, not from the checkout")
        torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        dtype = getattr(torch, a.dtype)
        if a.quick:                                                # the demo's tiny random model, bytes as tokens
            from cli import tiny_model_and_tokenizer
            model, _ = tiny_model_and_tokenizer("cpu", dtype)
            ids = list(range(1, a.tokens + 1))
        else:
            from load_llama import load_model, load_tokenizer, read_json
            model = load_model(Path(a.model), dtype=dtype)
            tok = load_tokenizer(Path(a.model), read_json(Path(a.model) / "config.json"))
            ids = tok.encode(Path(a.text).read_text(encoding="utf-8")[: 40 * a.tokens], bos=True)[: a.tokens]
        add_lora(model, rank=64, alpha=64.0, dropout=0.05)
        opt = make_optimizer(lora_parameters(model), 5e-5)
        half = a.tokens // 2
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # noqa: E731  MiB, the peak so far
        tell({"ready": True, "loaded_rss_mib": rss()})
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t = time.perf_counter()
            train_block(model, opt, ids[:half], ids[half:], 5e-5, epochs=1)
            tell({"seconds": time.perf_counter() - t, "rss_mib": rss()})
    except Exception as e:                                           # noqa: BLE001 - reported to the parent
        tell({"error": " / ".join(f"{type(e).__name__}: {e}".splitlines())})
        sys.exit(1)


def commit_of(checkout: str) -> str | None:
    """The checkout's commit (with '+changes' when its files differ from it), or None outside git."""
    run = lambda *cmd: subprocess.run(["git", "-C", checkout, *cmd], capture_output=True, text=True)  # noqa: E731
    head = run("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return None
    dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def compare(a: argparse.Namespace, log) -> dict:
    settings = {k: getattr(a, k) for k in ("tokens", "dtype", "threads", "model", "text", "quick")}
    names = ("a", "b")
    procs = {name: subprocess.Popen([sys.executable, "-u", __file__, "--serve", str(Path(d).resolve()),
                                     json.dumps(settings)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, d in zip(names, (a.a_dir, a.b_dir))}

    def receive(name) -> dict:
        where = f"checkout {name} ({getattr(a, name + '_dir')})"
        line = procs[name].stdout.readline()
        if not line:
            raise RuntimeError(f"{where}: its process ended, exit status {procs[name].wait()}")
        try:
            msg = json.loads(line)
        except ValueError:
            raise RuntimeError(f"{where}: not a message: {line.strip()[:200]!r}") from None
        if "error" in msg:
            raise RuntimeError(f"{where}: {msg['error']}")
        return msg

    def step(name) -> dict:
        procs[name].stdin.write("step\n")
        procs[name].stdin.flush()
        return receive(name)

    loaded = {}
    try:
        for name in names:
            loaded[name] = receive(name)
        for name in names:
            log(f"warm-up {name}: {step(name)['seconds']:.2f}s")
        rounds = []
        for r in range(a.rounds):
            row = {}
            for name in (names if r % 2 == 0 else names[::-1]):
                msg = step(name)
                row[name], row[f"{name}_rss_mib"] = msg["seconds"], msg["rss_mib"]
            rounds.append(row)
            log(f"round {r + 1}/{a.rounds}: a {row['a']:.2f}s  b {row['b']:.2f}s")
    finally:
        for proc in procs.values():
            try:
                proc.stdin.close()                                 # ends its loop
            except OSError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratios = [row["a"] / row["b"] for row in rounds]
    from bench.common import path_label
    return {
        "settings": {k: v for k, v in vars(a).items() if k not in ("a_dir", "b_dir", "out", "serve")}
        | {"model": None if a.quick else path_label(a.model), "text": None if a.quick else Path(a.text).name},
        "checkouts": {name: {"dir": path_label(d), "commit": commit_of(d)}
                      for name, d in zip(names, (a.a_dir, a.b_dir))},
        "loaded_rss_mib": {name: loaded[name]["loaded_rss_mib"] for name in names},
        "rounds": rounds,
        "median_s": {name: statistics.median(row[name] for row in rounds) for name in names},
        "ratio_a_over_b_median": statistics.median(ratios),
        "rounds_a_faster": sum(x < 1 for x in ratios),
        "peak_rss_mib": {name: rounds[-1][f"{name}_rss_mib"] for name in names},
    }


def parse_args(argv=None) -> argparse.Namespace:
    from bench.common import BOOK, MODEL_DIR
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a_dir", help="a checkout of this project (e.g. this repository)")
    p.add_argument("b_dir", help="another checkout (e.g. `git worktree add /tmp/old COMMIT`)")
    p.add_argument("--rounds", type=int, help="timed rounds, one step of each per round (default 8)")
    p.add_argument("--tokens", type=int, help="context + block tokens of the step, half each (default 2048)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=str(MODEL_DIR), help="checkpoint directory both load")
    p.add_argument("--text", default=str(BOOK), help="the book whose first tokens are the step's")
    p.add_argument("--out", help="write the result here as JSON")
    p.add_argument("--quick", action="store_true", help="a tiny random model, 64 tokens, 2 rounds")
    a = p.parse_args(argv)
    for flag, d in (("A_DIR", a.a_dir), ("B_DIR", a.b_dir)):
        missing = [f for f in NEEDED if not (Path(d) / f).is_file()]
        if missing:
            p.error(f"{flag}: {d} is not a checkout of this project (no {', '.join(missing)})")
    if a.quick and (a.tokens is not None or a.rounds is not None):
        p.error("--quick: runs 64 tokens and 2 rounds; drop --tokens and --rounds")
    if a.quick:
        a.tokens, a.rounds = 64, 2
    a.tokens = 2048 if a.tokens is None else a.tokens
    a.rounds = 8 if a.rounds is None else a.rounds
    if a.out and not Path(a.out).resolve().parent.is_dir():
        p.error(f"--out: no folder {Path(a.out).resolve().parent} to write {Path(a.out).name} in")
    if a.rounds < 1:
        p.error("--rounds: at least 1")
    if a.tokens < 4:
        p.error("--tokens: at least 4")
    if a.threads < 1:
        p.error("--threads: at least 1")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:                                    # a child of compare()
        serve(argv[1], json.loads(argv[2]))
        return 0
    from bench.common import require_books, require_model
    from protocol import write_json
    a = parse_args(argv)
    if not a.quick:
        require_model(a.model)
        require_books(a.text, "--text")

    def log(s):
        print(s, file=sys.stderr, flush=True)

    try:
        r = compare(a, log)
    except RuntimeError as e:                                      # a checkout whose functions differ, or failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"a {r['checkouts']['a']['dir']} ({r['checkouts']['a']['commit']}): median {r['median_s']['a']:.2f}s; "
          f"b {r['checkouts']['b']['dir']} ({r['checkouts']['b']['commit']}): median {r['median_s']['b']:.2f}s; "
          f"a / b per round: median {r['ratio_a_over_b_median']:.3f}, a faster in {r['rounds_a_faster']} of "
          f"{len(r['rounds'])}; peak RSS a {r['peak_rss_mib']['a']} MiB, b {r['peak_rss_mib']['b']} MiB")
    if a.out:
        write_json(a.out, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
