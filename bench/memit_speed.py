"""MEMIT speed benchmark: batched z optimisation against the reference code's one-at-a-time loop.

    python -m bench.memit_speed --n 64 --json runs/bench/memit_speed.json

Edits the first N CounterFact requests on SmolLM2-135M twice from the same base model, once with
each z optimiser (everything else shared: templates, C0, the layer updates), and prints seconds for
C0 (cold, in a fresh cache folder, and cached), z, the layer updates, edits per second, peak RSS, the
speed-up and ES/PS/NS/Score of both edited models.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

SCORES = ("es", "ps", "ns", "score")


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


def build_parser() -> argparse.ArgumentParser:
    """The ``fededit`` model and MEMIT options plus the benchmark's own."""
    from fededit_core.cli import add_hparam_args, add_model_args

    p = argparse.ArgumentParser(
        prog="python -m bench.memit_speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    add_hparam_args(p)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--data", help="CounterFact file (default: ../shared/data/counterfact/counterfact-val.json)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-reference", action="store_true", help="skip the one-at-a-time z loop")
    p.add_argument("--no-cold", action="store_true", help="use the cached C0 instead of timing a cold build")
    p.add_argument("--compare-cov", help="text file for a second C0 (default: ../shared/data/wikitext/wiki.test.raw)")
    return p


def scores(metrics: dict) -> dict:
    """ES, PS, NS and Score of a ``counterfact_metrics`` result."""
    return {k: metrics[k] for k in SCORES}


def time_c0(model, tok, hp, cov_root: Path | None):
    """C0 of the edited layers built, then loaded again: the cached store, seconds cold (None when
    ``cov_root`` is None: the project cache, not timed) and seconds cached."""
    from fededit_core.memit.covariance import CovarianceStore

    started = time.perf_counter()
    store = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len, root=cov_root)
    store.get_many(list(hp.layers))
    cov_cold = None if cov_root is None else time.perf_counter() - started
    started = time.perf_counter()
    cached = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len, root=cov_root)
    cached.get_many(list(hp.layers))
    return cached, cov_cold, time.perf_counter() - started


def edit_with_each_z(editor, requests, skip_reference: bool):
    """Edits from the base model with the batched and (unless skipped) the one-at-a-time z optimiser:
    the table rows, the timings and scores of each, and each edit."""
    from fededit_core.eval.metrics import counterfact_metrics

    rows, results, edits = [], {}, {}
    for name, reference in (("batched", False), ("one_at_a_time", True)):
        if reference and skip_reference:
            continue
        editor.reset()
        z = editor.compute_z(requests, reference=reference)
        result = editor.edit(requests, z=z)
        edits[name] = result
        metrics = counterfact_metrics(editor.model, editor.tok, requests)
        results[name] = {
            "z_s": z.seconds,
            "layers_s": result.seconds["layers"],
            "total_s": z.seconds + result.seconds["layers"],
            "mean_steps": sum(z.steps) / len(z.steps) + 1,
            **scores(metrics),
        }
        rows.append({"z optimiser": name, **results[name], "edits/s": len(requests) / results[name]["total_s"]})
    return rows, results, edits


def mkv_metrics(editor, requests, edit) -> dict:
    """Metrics of the batched edit written text-free: its MKVs (keys from the edit, and from the base
    model) applied to the base model."""
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.fedleke.mkv import apply_mkvs, compute_mkvs

    editor.reset()
    out = {}
    for keys_from, mkvs in (
        ("edit", compute_mkvs(editor, requests, edit=edit)),
        ("base", compute_mkvs(editor, requests, z=edit.z)),
    ):
        apply_mkvs(editor, mkvs)
        out[f"mkv_apply_{keys_from}_keys"] = counterfact_metrics(editor.model, editor.tok, requests)
        editor.reset()
    return out


def wikitext_metrics(editor, requests, z, wiki: str | Path, cov_root: Path):
    """Metrics of the batched z edited with a C0 from the text file ``wiki`` (built cold in ``cov_root``)
    instead, and that C0's seconds."""
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.memit.covariance import CovarianceStore
    from fededit_core.memit.editor import MemitEditor

    model, tok, hp = editor.model, editor.tok, editor.hp
    wiki_store = CovarianceStore(model, tok, str(wiki), hp.cov_samples, hp.cov_seq_len, root=cov_root)
    started = time.perf_counter()
    wiki_store.get_many(list(hp.layers))
    wiki_cov_s = time.perf_counter() - started
    MemitEditor(model, tok, hp, templates=editor.templates, covariance=wiki_store).edit(requests, z=z)
    metrics = counterfact_metrics(model, tok, requests)
    editor.reset()
    return metrics, wiki_cov_s


def summary(args, requests, data: Path, hp, unedited: dict, results: dict, seconds: dict) -> dict:
    """The JSON record: the batched edit's timings and scores at the top, every method under "methods"."""
    from fededit_core.paths import recorded_path

    batched = results["batched"]
    out = {
        "n": len(requests),
        "data": recorded_path(data),
        "model": args.model,
        "hparams": hp.model_dump(),
        **seconds,
        "batched_s": batched["total_s"],
        "batched_z_s": batched["z_s"],
        "layers_s": batched["layers_s"],
        "edits_per_s": len(requests) / batched["total_s"],
        "es": batched["es"],
        "ps": batched["ps"],
        "ns": batched["ns"],
        "score": batched["score"],
        "unedited": scores(unedited),
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "methods": results,
    }
    if "one_at_a_time" in results:
        ref = results["one_at_a_time"]
        out.update(
            one_at_a_time_s=ref["total_s"],
            one_at_a_time_z_s=ref["z_s"],
            speedup=ref["total_s"] / batched["total_s"],
            z_speedup=ref["z_s"] / batched["z_s"],
            reference_es=ref["es"],
            reference_ps=ref["ps"],
            reference_ns=ref["ns"],
        )
    return out


def print_report(out: dict, data: Path, hp, rows: list[dict]) -> None:
    """The benchmark's lines and table on the terminal."""
    from fededit_core.eval.tables import format_table

    print(
        f"MEMIT on {out['model']}, {out['n']} CounterFact edits from {data.name}, layers {list(hp.layers)}, "
        f"{out['threads']} threads"
    )
    cov_cold, wiki_cov_s = out["cov_cold_s"], out["wikitext_cov_s"]
    cold_text = "not timed (--no-cold)" if cov_cold is None else f"{cov_cold:.1f} s cold"
    print(
        f"C0: {cold_text} ({hp.cov_source}, {hp.cov_samples} x {hp.cov_seq_len} tokens), "
        f"{out['cov_cached_s']:.2f} s cached" + (f"; WikiText C0 {wiki_cov_s:.1f} s cold" if wiki_cov_s else "")
    )
    columns = ["z optimiser", "z_s", "layers_s", "total_s", "edits/s", "mean_steps", *SCORES]
    print(format_table([{"z optimiser": "unedited", **out["unedited"]}] + rows, columns))
    if "speedup" in out:
        print(f"speed-up (total): {out['speedup']:.2f}x, z alone: {out['z_speedup']:.2f}x")
    print(f"peak RSS: {out['peak_rss_mb']:.0f} MB")


def run(args) -> int:
    from fededit_core.data.loaders import load_requests
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.memit.editor import MemitEditor, hparams_for
    from fededit_core.memit.overrides import memit_overrides
    from fededit_core.model.loading import configure_threads, load_model

    configure_threads()
    data = Path(args.data) if args.data else default_data()
    if data is None or not data.is_file():
        raise FileNotFoundError("no CounterFact file: pass --data (../shared/data is not here)")
    requests = load_requests(data, n=args.n)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    hp = hparams_for(model, **memit_overrides(vars(args)))
    unedited = counterfact_metrics(model, tok, requests)

    with tempfile.TemporaryDirectory(prefix="fededit-cov-") as cold_root:
        cov_root = None if args.no_cold else Path(cold_root)  # None: the project cache
        cached, cov_cold, cov_cached = time_c0(model, tok, hp, cov_root)
        editor = MemitEditor(model, tok, hp, covariance=cached)
        rows, results, edits = edit_with_each_z(editor, requests, args.skip_reference)
        # the same batched z written text-free (MKVs on the base model) and with a WikiText C0
        extra, wiki_cov_s = mkv_metrics(editor, requests, edits["batched"]), None
        wiki = args.compare_cov or default_wikitext()
        if wiki and Path(wiki).is_file():
            z = edits["batched"].z
            extra["wikitext_c0"], wiki_cov_s = wikitext_metrics(editor, requests, z, wiki, Path(cold_root))
        for name, metrics in extra.items():
            results[name] = scores(metrics)
            rows.append({"z optimiser": f"batched, {name.replace('_', ' ')}", **results[name]})

    seconds = {"cov_cold_s": cov_cold, "cov_cached_s": cov_cached, "wikitext_cov_s": wiki_cov_s}
    out = summary(args, requests, data, hp, unedited, results, seconds)
    print_report(out, data, hp, rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
