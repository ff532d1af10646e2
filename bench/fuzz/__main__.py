"""``python -m bench.fuzz``: the three doors, tallied (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.fuzz.client import fuzz_client
from bench.fuzz.loaders import fuzz_loaders
from bench.fuzz.server import fuzz_server
from fededit_core.io import atomic_write


def main(argv: list[str] | None = None) -> int:
    from fededit_core.model.loading import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="cases per server step type, client and loaders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the client's model (default: %(default)s)")
    parser.add_argument("--only", choices=["server", "client", "loaders"], action="append")
    parser.add_argument("--json", type=Path, help="write the tallies here")
    args = parser.parse_args(argv)
    parts = args.only or ["server", "client", "loaders"]
    started = time.perf_counter()
    out: dict = {}
    if "server" in parts:
        out["server"] = fuzz_server(args.n, args.seed)
    if "client" in parts:
        out["client"] = fuzz_client(args.n, args.seed, args.model)
    if "loaders" in parts:
        out["loaders"] = fuzz_loaders(args.n, args.seed)
    out["seconds"] = round(time.perf_counter() - started, 1)
    for part in parts:
        t = out[part]
        print(
            f"{part:8s} cases {t['cases']:6d}  crashed {t['crashed']:4d}  accepted_invalid {t['accepted_invalid']:4d}  rejected {t['rejected']:6d}"
        )
        for failure in t["failures"][:10]:
            print("   ", failure)
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=1))
    return 0 if all(out[p]["crashed"] == 0 and out[p]["accepted_invalid"] == 0 for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
