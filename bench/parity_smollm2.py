"""Real-checkpoint parity: our loader + model vs transformers on SmolLM2-135M (dev dependencies).

    python -m bench.parity_smollm2 [--model DIR] [--book BOOK]     # the model: python -m tools.smollm2

Prints perplexity of both on the same token ids (fp32 and bf16), tokenizer agreement with HF
`tokenizers` on the whole book, and greedy continuations from both.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from bench.common import BOOK, MODEL_DIR, require_books, require_model
from load_llama import load_llama
from model import KVCache, generate


def ppl(logits, ids):
    return math.exp(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--book", default=str(BOOK))
    p.add_argument("--tokens", type=int, default=2048)
    a = p.parse_args()
    require_model(a.model)
    require_books(a.book, "--book")
    import tokenizers
    import transformers

    text = open(a.book, encoding="utf-8").read()
    model, tok = load_llama(a.model, dtype=torch.float32)
    hf_tok = tokenizers.Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    t = time.perf_counter()
    ours_ids = tok.encode(text)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    hf_ids = hf_tok.encode(text, add_special_tokens=False).ids
    t_hf = time.perf_counter() - t
    print(f"tokenizer: {len(ours_ids)} ids on the whole book, identical to HF tokenizers: {ours_ids == hf_ids} "
          f"(ours {t_ours:.2f}s, HF {t_hf:.2f}s)")

    ids = torch.tensor([ours_ids[: a.tokens]])
    for dtype in (torch.float32, torch.bfloat16):
        ours, _ = load_llama(a.model, dtype=dtype)
        hf = transformers.LlamaForCausalLM.from_pretrained(a.model, dtype=dtype)
        with torch.no_grad():
            lo, lh = ours(ids), hf(ids).logits
        po, ph = ppl(lo, ids), ppl(lh, ids)
        print(f"{str(dtype):15} ppl ours {po:.4f}  transformers {ph:.4f}  relative diff {100 * abs(po - ph) / ph:.4f}%  "
              f"max|dlogit| {(lo.float() - lh.float()).abs().max().item():.2e}")

    prompt = tok.encode("The old harvester walked slowly through the forest, and")
    ours_new = generate(model, KVCache(model.args, 1, 256), prompt, 0, 80, stop_ids=tuple(tok.stop_ids))
    hf = transformers.LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    hf_new = hf.generate(torch.tensor([prompt]), max_new_tokens=80, do_sample=False)[0, len(prompt):].tolist()
    print("greedy continuation identical to transformers:", ours_new == hf_new[: len(ours_new)])
    print("ours:", repr(tok.decode(prompt + ours_new)))


if __name__ == "__main__":
    main()
