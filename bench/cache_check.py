"""Rerun cached benchmark experiments with the code as it is and compare their figures to the cache:
an engine change that must not change results (e.g. the editor interface for MEMIT) shows here.

    python -m bench.cache_check --section ablation --labels 50/centralised,50/fededit

Each experiment of ``--section`` (default preset, CounterFact unless ``--dataset``) named in
``--labels`` is rerun in a fresh results folder (the base-model z are shared) and its weighted
figures are printed beside the cached ones. Exit status 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench import reproduce
from bench.experiments import Runner
from bench.zcache import BaseZCache
from fededit_core.client.worker import EditWorker
from fededit_core.model.loading import configure_threads
from fededit_core.paths import cache_dir


def weighted_of(result: dict) -> dict:
    return result.get("weighted") or result["report"]["weighted"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", required=True, choices=reproduce.SECTIONS)
    p.add_argument("--labels", required=True, help="comma-separated labels of the section's experiments")
    p.add_argument("--dataset", default="counterfact", choices=sorted(reproduce.DEFAULT_DATA))
    p.add_argument("--cache", default=None, help="the benchmark cache (default <fededit cache>/bench)")
    args = p.parse_args(argv)
    configure_threads()
    cache = Path(args.cache) if args.cache else cache_dir("bench")
    data = {k: Path(v) for k, v in reproduce.DEFAULT_DATA.items()}
    z_cache = BaseZCache(cache / "z")
    cached = Runner(cache, data, reproduce.DEFAULT_MODEL, {}, EditWorker(z_cache=z_cache))
    planned = reproduce.plan(reproduce.PRESETS["default"], args.section, args.dataset)
    same = True
    with tempfile.TemporaryDirectory() as fresh_dir:
        fresh = Runner(Path(fresh_dir), data, reproduce.DEFAULT_MODEL, {}, EditWorker(z_cache=z_cache), EditWorker)
        for label in args.labels.split(","):
            if label not in planned:
                p.error(f"{label!r} is not an experiment of {args.section}: {sorted(planned)}")
            before = cached.cached(planned[label])
            if before is None:
                p.error(f"{label!r} is not in the cache {cache}")
            old, new = weighted_of(before), weighted_of(fresh.run(planned[label]))
            same &= old == new
            print(f"{label}\n  cached {json.dumps(old)}\n  now    {json.dumps(new)}\n  equal  {old == new}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
