"""CPU time of the chunked linear cross-entropy (loss + backward) with an NF4 lm_head: whole head vs streamed.

    python bench/lm_head_stream.py                          # SmolLM2-135M's head (49152 x 576), 512 tokens
    python bench/lm_head_stream.py --tokens 256 --blocks 2048,8192

"whole head" dequantizes the head once into a dense (V, H) copy (what `causal_lm_loss` did before the streamed
path) and runs the dense chunked loss; "streamed" passes the `NF4Weight` itself, so the loss dequantizes one
vocabulary block at a time, twice (pass 1: online logsumexp; pass 2: dlogits and dX). Prints the minimum of
``--repeat`` runs and the largest weight copy each path holds. Torch backend, fp32, one thread.
"""

from __future__ import annotations

import argparse
import time

import torch

from slimtune.ops.linear_ce import linear_cross_entropy, vocab_block_rows
from slimtune.ops.nf4 import dense_weight, quantize_4bit


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--blocks", default="default,2048", help="comma-separated vocabulary block rows ('default')")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if min(args.tokens, args.hidden, args.vocab, args.repeat) < 1:
        ap.error("--tokens, --hidden, --vocab and --repeat must be positive")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = quantize_4bit(torch.randn(args.vocab, args.hidden) * 0.05, double_quant=True)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    t = torch.randint(0, args.vocab, (args.tokens,))
    mib = lambda rows: rows * args.hidden * 4 / 2**20  # noqa: E731  fp32 weight copy

    def whole():
        linear_cross_entropy(x, dense_weight(w, torch.float32), t, backend="torch").backward()

    print(f"head {args.vocab} x {args.hidden} (NF4 + double quant), {args.tokens} tokens, fp32, 1 thread")
    print(f"  whole head             {_time(whole, args.repeat) * 1e3:7.0f} ms   holds {mib(args.vocab):6.1f} MiB")
    for b in args.blocks.split(","):
        rows = None if b.strip() == "default" else int(b)
        block = vocab_block_rows(w, torch.float32, rows)

        def streamed(rows=rows):
            linear_cross_entropy(x, w, t, backend="torch", vocab_block=rows).backward()

        label = f"streamed {block} rows"
        print(f"  {label:<22} {_time(streamed, args.repeat) * 1e3:7.0f} ms   holds {mib(block):6.1f} MiB")


if __name__ == "__main__":
    main()
