"""Greedy generation speed against batch size (what sets ``metrics.GENERATION_BATCH``).

    python -m bench.generation_speed --n 64 --batches 16,32,64 [--data FILE] [--tokens 40]

Generates ``--tokens`` greedy tokens from the first N CounterFact edit prompts on SmolLM2-135M at
each batch size (one warm-up batch first), and prints the seconds per batch size and how many
texts equal those of the first batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fededit_core.model.loading import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    from bench.memit_speed import default_data
    from fededit_core.data.loaders import load_requests
    from fededit_core.eval.metrics import generate_greedy
    from fededit_core.model.loading import configure_threads, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="prompts")
    p.add_argument("--batches", default="16,32,64", help="comma-separated batch sizes")
    p.add_argument("--tokens", type=int, default=40, help="new tokens per prompt")
    p.add_argument("--data", default=None, help="CounterFact file (default ../shared/data's validation split)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    data = Path(args.data) if args.data else default_data()
    if data is None or not data.is_file():
        p.error("no CounterFact file: pass --data (../shared/data is not here)")
    configure_threads()
    prompts = [r.text for r in load_requests(data, n=args.n)]
    model, tok = load_model(args.model)
    generate_greedy(model, tok, prompts[:4], max_new_tokens=2)  # warm-up
    first = None
    for batch in batches:
        start = time.perf_counter()
        texts = generate_greedy(model, tok, prompts, max_new_tokens=args.tokens, batch_size=batch)
        seconds = time.perf_counter() - start
        first = first or texts
        same = sum(a == b for a, b in zip(first, texts))
        print(
            f"batch {batch:4d}: {len(prompts)} prompts x {args.tokens} tokens in {seconds:6.1f} s; "
            f"{same}/{len(prompts)} texts equal to batch {batches[0]}'s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
