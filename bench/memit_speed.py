"""MEMIT speed benchmark: batched z optimisation against the reference code's one-at-a-time loop.

    python -m bench.memit_speed --n 64 --json runs/bench/memit_speed.json
    fededit bench memit --n 64 --json OUT        (the same)

Edits the first N CounterFact requests on SmolLM2-135M twice from the same base model, once with
each z optimiser (everything else shared: templates, C0, the layer updates), and prints seconds for
C0 (cold, in a fresh cache folder, and cached), z, the layer updates, edits per second, peak RSS, the
speed-up and ES/PS/NS/Score of both edited models.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_data() -> Path | None:
    from fededit_core.paths import shared_data_dir

    shared = shared_data_dir()
    return shared / "counterfact" / "counterfact-val.json" if shared else None


def default_wikitext() -> Path | None:
    from fededit_core.paths import shared_data_dir

    shared = shared_data_dir()
    return shared / "wikitext" / "wiki.test.raw" if shared else None


def run(args) -> int:
    from fededit_core.covariance import CovarianceStore
    from fededit_core.datasets import load_requests
    from fededit_core.memit import MemitEditor
    from fededit_core.metrics import counterfact_metrics
    from fededit_core.mkv import apply_mkvs, compute_mkvs
    from fededit_core.models import load_model
    from fededit_core.pipeline import configure_threads, hparams_for
    from fededit_core.report import format_table

    configure_threads()
    data = Path(args.data) if args.data else default_data()
    if data is None or not data.is_file():
        raise FileNotFoundError("no CounterFact file: pass --data (../shared/data is not here)")
    requests = load_requests(data, n=args.n)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    overrides = {k: getattr(args, k, None) for k in ("layers", "mom2_weight", "v_steps", "batch_size",
                                                      "cov_source", "cov_samples", "autocast")}
    hp = hparams_for(model, **overrides)
    unedited = counterfact_metrics(model, tok, requests)

    with tempfile.TemporaryDirectory(prefix="fededit-cov-") as cold_root:
        cov_root = None if args.no_cold else Path(cold_root)  # None: the project cache
        started = time.perf_counter()
        store = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len, root=cov_root)
        store.get_many(list(hp.layers))
        cov_cold = None if args.no_cold else time.perf_counter() - started
        started = time.perf_counter()
        cached = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len, root=cov_root)
        cached.get_many(list(hp.layers))
        cov_cached = time.perf_counter() - started
        editor = MemitEditor(model, tok, hp, covariance=cached)

        rows, results, edits = [], {}, {}
        for name, reference in (("batched", False), ("one_at_a_time", True)):
            if reference and args.skip_reference:
                continue
            editor.reset()
            z = editor.compute_z(requests, reference=reference)
            result = editor.edit(requests, z=z)
            edits[name] = result
            metrics = counterfact_metrics(model, tok, requests)
            results[name] = {"z_s": z.seconds, "layers_s": result.seconds["layers"],
                             "total_s": z.seconds + result.seconds["layers"],
                             "mean_steps": sum(z.steps) / len(z.steps) + 1,
                             **{k: metrics[k] for k in ("es", "ps", "ns", "score")}}
            rows.append({"z optimiser": name, **results[name],
                         "edits/s": len(requests) / results[name]["total_s"]})
        # the same batched z written text-free (MKVs on a fresh copy) and with a WikiText C0
        editor.reset()
        extra, wiki_cov_s = {}, None
        z = edits["batched"].z
        for keys_from, mkvs in (("edit", compute_mkvs(editor, requests, edit=edits["batched"])),
                                ("base", compute_mkvs(editor, requests, z=z))):
            apply_mkvs(editor, mkvs)
            extra[f"mkv_apply_{keys_from}_keys"] = counterfact_metrics(model, tok, requests)
            editor.reset()
        wiki = args.compare_cov or default_wikitext()
        if wiki and Path(wiki).is_file():
            wiki_store = CovarianceStore(model, tok, str(wiki), hp.cov_samples, hp.cov_seq_len, root=Path(cold_root))
            started = time.perf_counter()
            wiki_store.get_many(list(hp.layers))
            wiki_cov_s = time.perf_counter() - started
            MemitEditor(model, tok, hp, templates=editor.templates, covariance=wiki_store).edit(requests, z=z)
            extra["wikitext_c0"] = counterfact_metrics(model, tok, requests)
            editor.reset()
        for name, metrics in extra.items():
            results[name] = {k: metrics[k] for k in ("es", "ps", "ns", "score")}
            rows.append({"z optimiser": f"batched, {name.replace('_', ' ')}", **results[name]})

    out = {"n": len(requests), "data": str(data), "model": args.model, "hparams": hp.model_dump(),
           "cov_cold_s": cov_cold, "cov_cached_s": cov_cached, "wikitext_cov_s": wiki_cov_s,
           "batched_s": results["batched"]["total_s"], "batched_z_s": results["batched"]["z_s"],
           "layers_s": results["batched"]["layers_s"],
           "edits_per_s": len(requests) / results["batched"]["total_s"],
           "es": results["batched"]["es"], "ps": results["batched"]["ps"], "ns": results["batched"]["ns"],
           "score": results["batched"]["score"],
           "unedited": {k: unedited[k] for k in ("es", "ps", "ns", "score")},
           "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "torch": torch.__version__, "methods": results}
    if "one_at_a_time" in results:
        ref = results["one_at_a_time"]
        out.update(one_at_a_time_s=ref["total_s"], one_at_a_time_z_s=ref["z_s"],
                   speedup=ref["total_s"] / results["batched"]["total_s"],
                   z_speedup=ref["z_s"] / results["batched"]["z_s"],
                   reference_es=ref["es"], reference_ps=ref["ps"], reference_ns=ref["ns"])
    print(f"MEMIT on {args.model}, {len(requests)} CounterFact edits from {data.name}, layers {list(hp.layers)}, "
          f"{torch.get_num_threads()} threads")
    cold_text = "not timed (--no-cold)" if cov_cold is None else f"{cov_cold:.1f} s cold"
    print(f"C0: {cold_text} ({hp.cov_source}, {hp.cov_samples} x {hp.cov_seq_len} tokens), "
          f"{cov_cached:.2f} s cached" + (f"; WikiText C0 {wiki_cov_s:.1f} s cold" if wiki_cov_s else ""))
    print(format_table([{"z optimiser": "unedited", **{k: unedited[k] for k in ("es", "ps", "ns", "score")}}] + rows,
                       ["z optimiser", "z_s", "layers_s", "total_s", "edits/s", "mean_steps", "es", "ps", "ns", "score"]))
    if "speedup" in out:
        print(f"speed-up (total): {out['speedup']:.2f}x, z alone: {out['z_speedup']:.2f}x")
    print(f"peak RSS: {out['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    from fededit_core.cli import build_parser

    return run(build_parser().parse_args(["bench", "memit", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
