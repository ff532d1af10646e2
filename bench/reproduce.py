"""Reproduce the FedLEKE paper's experiments (Tables 1-3, Figures 5-6) and CollabEdit's comparison on
the embedded SmolLM2-135M: one command, cached and resumable.

    python -m bench.reproduce --quick          # smoke check, < 15 min on 2 CPU cores
    python -m bench.reproduce                  # the default preset, < 2.5 h (run it in the background)
    fededit-bench [--quick] [--out results/bench]

Sections, in the order they run for each data set, CounterFact first (the outputs are rewritten
after every experiment, so an interrupted run leaves every finished table; rerunning continues
from the cache):
  main      Table 1 / Table 2: every method on CounterFact and zsRE (paper partitions)
  ablation  Table 3: FedEdit with and without the re-edit condition at three sizes
  slots     Figure 6: Score against the number of time slots
  clients   Figure 5: Score against the number of clients
  overlap   ~30% of requests repeated at another client: share of z reused, time saved (real z)
  iid       the IID split, for contrast
  merging   CollabEdit's Figure 1: global MEMIT, SA, TA, TIES and CollabEdit in one round, against edits
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from bench.zcache import BaseZCache
from fededit_core.cli import add_hparam_args, add_model_args
from fededit_core.client.worker import ClientSpec, EditWorker
from fededit_core.data.loaders import DEFAULT_ZSRE_TARGET
from fededit_core.fedleke.reedit import DEFAULT_ALPHA, DEFAULT_GATE, DEFAULT_VECTOR
from fededit_core.memit.hparams import DEFAULT_EDITOR
from fededit_core.memit.overrides import memit_overrides
from fededit_core.memit.update import DEFAULT_STATISTICS_FORM
from fededit_core.model.loading import DEFAULT_MODEL, configure_threads
from fededit_core.paths import cache_dir, shared_data_dir
from strategies.collabedit import CONFLICT_POLICIES

from .experiments import Runner, select_requests
from .tables import MAIN_METHODS, SEQUENTIAL_SECTIONS, dataset_json, suffix_of, write_outputs

log = logging.getLogger("fededit.bench")
SHARED = shared_data_dir() or Path("../shared/data")  # development and CI only; users pass their files
DEFAULT_DATA = {
    "counterfact": SHARED / "counterfact" / "counterfact-train.json",
    "zsre": SHARED / "zsre" / "zsre_mend_eval-600.json",
}
PARTITION = {"counterfact": "relation", "zsre": "cluster"}  # the FedLEKE paper's schemes
SECTIONS = (
    "main",
    "ablation",
    "slots",
    "clients",
    "overlap",
    "iid",
    "merging",
    "collab_overlap",
    "conflict",
    "forgetting",
    "sequential",
    "sequential_long",
)
MERGING_METHODS = ("centralised", "sa", "ta", "ties", "collabedit")  # CollabEdit's Figure 1
FORGETTING_BETA1 = (0.0, 1.0)  # plain MEMIT statistics against the CollabEdit authors' dynamic covariance


@dataclass(frozen=True)
class Preset:
    name: str
    n_edits: dict[str, int]
    n_clients: int
    n_slots: int
    ablation_sizes: tuple[int, ...]
    curve_edits: int  # edits of the Figure 5/6 sweeps and the IID contrast (CounterFact)
    client_counts: tuple[int, ...]
    slot_counts: tuple[int, ...]
    overlap_edits: int
    overlap_clients: int
    overlap_slots: int
    merging_edits: tuple[int, ...] = (25, 50, 100, 200, 400)  # CollabEdit's Figure 1, one round
    # CollabEdit's challenge workloads (bench.collab_workloads): clients x slots x requests per slot
    challenge_grid: tuple[int, int, int] = (4, 2, 20)
    collab_overlap_share: float = 0.3  # positions of a slot holding another client's request
    conflict_share: float = 0.1  # requests edited again to another object by another client
    conflict_same_slot: float = 0.5  # of those conflicts, the share whose second edit is in the same slot
    forgetting_grid: tuple[int, int, int] = (4, 5, 10)  # clients, rounds (round 0: the old edits), per round
    sequential_edits: int = 160  # the first slot's edits after every slot
    sequential_methods: tuple[str, ...] = ("centralised", "fededit")
    # the same curve on a workload large enough for MEMIT to forget (AlphaEdit's case): 10 slots x 100
    sequential_long_edits: int = 1000
    sequential_long_methods: tuple[str, ...] = ("centralised", "fededit")
    curve_methods: tuple[str, ...] = ("fededit",)
    # another editor's main table: the FedLEKE paper's rows (Tables 1-2) and CollabEdit; the weight
    # merges (sa / ta / ties, editavg-factors) and the dense statistics are MEMIT's table's
    editor_methods: tuple[str, ...] = ("local", "editavg", "fededit-noreedit", "fededit", "collabedit")
    one_batch: bool = True  # also the one-batch centralised edit of the union (main table)
    others_limit: int = 25  # other clients' absorbed requests evaluated per client
    fluency: bool = True  # CounterFact main table only
    seed: int = 0
    alpha: float = DEFAULT_ALPHA
    gate: str = DEFAULT_GATE
    vector: str = DEFAULT_VECTOR
    zsre_target: str = DEFAULT_ZSRE_TARGET
    collab_transport: str = DEFAULT_STATISTICS_FORM  # CollabEdit's main run; the other form is run beside it
    datasets: tuple[str, ...] = ("counterfact", "zsre")


PRESETS = {
    # quick: the largest ablation size is the main size, so Table 3 reuses the main runs; no fluency
    "quick": Preset(
        "quick",
        {"counterfact": 24, "zsre": 24},
        n_clients=4,
        n_slots=2,
        ablation_sizes=(12, 24),
        curve_edits=24,
        client_counts=(2, 4),
        slot_counts=(1, 2),
        overlap_edits=8,
        overlap_clients=2,
        overlap_slots=2,
        merging_edits=(12, 24),
        challenge_grid=(2, 2, 5),
        forgetting_grid=(2, 3, 2),
        sequential_edits=24,
        sequential_long_edits=48,
        others_limit=6,
        fluency=False,
    ),
    "default": Preset(
        "default",
        {"counterfact": 400, "zsre": 400},
        n_clients=8,
        n_slots=10,
        ablation_sizes=(50, 100, 400),
        curve_edits=80,
        client_counts=(2, 4, 8),
        slot_counts=(1, 5, 10),
        overlap_edits=48,
        overlap_clients=4,
        overlap_slots=4,
        one_batch=False,
    ),
}


def base_exp(preset: Preset, dataset: str, method: str, **changes) -> dict:
    n = preset.n_edits[dataset]
    exp = {
        "dataset": dataset,
        "kind": dataset,
        "n_edits": n,
        "partition": PARTITION[dataset],
        "n_clients": preset.n_clients,
        "n_slots": preset.n_slots,
        "method": method,
        "seed": preset.seed,
        "alpha": preset.alpha,
        "gate": preset.gate,
        "vector": preset.vector,
        "reuse": True,
        "fluency": False,
        "others_limit": preset.others_limit,
    }
    if dataset == "zsre":
        exp["zsre_target"] = preset.zsre_target
    if method == "collabedit":
        exp["collab_transport"] = preset.collab_transport
    exp.update(changes)
    if method == "centralised":  # no federation settings: identical runs share one cache entry
        for key in ("alpha", "gate", "vector", "reuse", "others_limit"):
            exp.pop(key)
    return exp


def plan(preset: Preset, section: str, dataset: str, editor: str = DEFAULT_EDITOR) -> dict[str, dict]:
    """``{label: experiment}`` of one section for one data set, with the editor the run's settings name."""
    out: dict[str, dict] = {}
    fl = preset.fluency and dataset == "counterfact"
    curve = {"n_edits": preset.curve_edits}
    if section == "main":
        out["unedited+centralised"] = base_exp(preset, dataset, "centralised", fluency=fl)
        if preset.one_batch:
            out["centralised (one batch)"] = base_exp(preset, dataset, "centralised", n_slots=1, fluency=fl)
        for m in MAIN_METHODS if editor == DEFAULT_EDITOR else preset.editor_methods:
            out[m] = base_exp(preset, dataset, m, fluency=fl)
        if editor == DEFAULT_EDITOR and preset.collab_transport != "dense":  # its bytes beside, same model
            out["collabedit-dense"] = base_exp(preset, dataset, "collabedit", collab_transport="dense", fluency=fl)
    elif section == "ablation":
        for n in preset.ablation_sizes:
            for m in ("centralised", "fededit-noreedit", "fededit"):
                fl_n = fl if n == preset.n_edits[dataset] else False  # the main run's size: its cached runs
                out[f"{n}/{m}"] = base_exp(preset, dataset, m, n_edits=n, fluency=fl_n)
    elif section == "clients" and dataset == "counterfact":
        for k in preset.client_counts:
            for m in ("centralised", *preset.curve_methods):
                out[f"{k}/{m}"] = base_exp(preset, dataset, m, n_clients=k, **curve)
    elif section == "slots" and dataset == "counterfact":
        for t in preset.slot_counts:
            for m in ("centralised", *preset.curve_methods):
                out[f"{t}/{m}"] = base_exp(preset, dataset, m, n_slots=t, **curve)
    elif section == "overlap" and dataset == "counterfact":
        common = {
            "n_edits": preset.overlap_edits,
            "partition": "iid",
            "n_clients": preset.overlap_clients,
            "n_slots": preset.overlap_slots,
            "overlap": 0.3,
            "real_z": True,
        }
        out["reuse"] = base_exp(preset, dataset, "fededit", **common)
        out["no reuse"] = base_exp(preset, dataset, "fededit", **{**common, "reuse": False})
    elif section == "merging" and dataset == "counterfact":
        for n in preset.merging_edits:
            for m in MERGING_METHODS:
                out[f"{n}/{m}"] = base_exp(preset, dataset, m, n_edits=n, n_slots=1)
    elif section in ("collab_overlap", "conflict") and dataset == "counterfact":
        clients, slots, per = preset.challenge_grid
        grid = {"n_edits": clients * slots * per, "n_clients": clients, "n_slots": slots, "workload": section}
        if section == "collab_overlap":
            for dedup in (True, False):
                out["dedup" if dedup else "no dedup"] = base_exp(
                    preset, dataset, "collabedit", **grid, overlap=preset.collab_overlap_share, collab_dedup=dedup
                )
        else:
            for policy in CONFLICT_POLICIES:
                out[policy] = base_exp(
                    preset,
                    dataset,
                    "collabedit",
                    **grid,
                    conflict_share=preset.conflict_share,
                    conflict_same_slot=preset.conflict_same_slot,
                    collab_conflict=policy,
                )
    elif section == "forgetting" and dataset == "counterfact":
        clients, rounds, per = preset.forgetting_grid
        for beta1 in FORGETTING_BETA1:
            for k in range(1, rounds + 1):
                out[f"{beta1:g}/{k}"] = base_exp(
                    preset,
                    dataset,
                    "collabedit",
                    workload="forgetting",
                    n_edits=clients * rounds * per,
                    n_clients=clients,
                    n_slots=k,
                    per_round=per,
                    beta1=beta1,
                )
    elif section in SEQUENTIAL_SECTIONS and dataset == "counterfact":  # sizes and methods: <section>_edits, _methods
        n = getattr(preset, f"{section}_edits")
        for m in getattr(preset, f"{section}_methods"):
            out[m] = base_exp(preset, dataset, m, n_edits=n, first_slot_curve=True)
    elif section == "iid" and dataset == "counterfact":
        for m in ("centralised", "fededit", "editavg"):
            out[m] = base_exp(preset, dataset, m, partition="iid", **curve)
    return out


def environment() -> dict:
    import flwr
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flwr": flwr.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
    }


def make_runner(
    cache: Path, data_files: dict[str, Path], model: str, device: str, dtype: str, hparams: dict | None
) -> Runner:
    """The benchmark's experiment runner: results under ``cache/results``, every z from the base-model
    cache ``cache/z`` (the overlap workload's real-z runs use a plain worker)."""
    configure_threads()
    worker = EditWorker(z_cache=BaseZCache(cache / "z"))
    return Runner(
        cache,
        data_files,
        model,
        dict(hparams or {}),
        worker,
        plain_worker_factory=EditWorker,
        device=device,
        dtype=dtype,
    )


def run(
    preset: Preset,
    out: Path,
    cache: Path,
    data_files: dict[str, Path],
    sections: tuple[str, ...],
    model: str = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: str = "fp32",
    hparams: dict | None = None,
) -> dict:
    """Run ``sections`` of ``preset`` (cached experiments are read back) and write the outputs to ``out``."""
    runner = make_runner(cache, data_files, model, device, dtype, hparams)
    z_cache, worker = runner.worker.z_cache, runner.worker
    env = environment()
    editor = runner.hparams.get("editor", DEFAULT_EDITOR)
    results: dict[str, dict] = {d: {} for d in preset.datasets}
    prefilled: set[str] = set()
    for dataset in preset.datasets:  # data set by data set: every table of CounterFact comes first
        for section in sections:
            planned = plan(preset, section, dataset, editor)
            if not planned:
                continue
            if dataset not in prefilled:  # every z of the data set on the base model first, one progress bar
                requests = select_requests(
                    data_files[dataset], preset.n_edits[dataset], preset.seed, preset.zsre_target
                )
                spec = ClientSpec(
                    run="bench",
                    name="client-0",
                    model=model,
                    device=device,
                    dtype=dtype,
                    hparams=runner.hparams,
                    requests="builtin",
                    state_dir=str(cache / "work"),
                )
                z_cache.prefill(worker.editor(spec), requests, chunk=32)
                prefilled.add(dataset)
            results[dataset][section] = {label: runner.run(exp) for label, exp in planned.items()}
            write_outputs(out, preset, results, env, data_files, model, editor)
    return {d: dataset_json(preset, d, results[d], env, data_files, model, editor) for d in preset.datasets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fededit-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smoke-check preset (< 15 min on 2 cores)")
    p.add_argument("--out", default=None, help="output folder (default results/bench, or runs/bench-quick)")
    p.add_argument("--cache", default=None, help="cache folder (default <fededit cache>/bench)")
    p.add_argument("--counterfact", default=str(DEFAULT_DATA["counterfact"]), help="CounterFact file")
    p.add_argument("--zsre", default=str(DEFAULT_DATA["zsre"]), help="zsRE file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument(
        "--datasets",
        default=None,
        help="comma-separated subset of counterfact,zsre (default both; e.g. one per core, then both from the cache)",
    )
    add_model_args(p)
    add_hparam_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preset = PRESETS["quick" if args.quick else "default"]
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; expected a subset of {list(SECTIONS)}")
    if args.datasets is not None:
        datasets = tuple(d for d in args.datasets.split(",") if d)
        unknown = sorted(set(datasets) - set(preset.datasets))
        if unknown or not datasets:
            p.error(f"unknown data sets {unknown or datasets}; expected a subset of {list(preset.datasets)}")
        preset = replace(preset, datasets=datasets)
    data_files = {"counterfact": Path(args.counterfact), "zsre": Path(args.zsre)}
    for name, path in data_files.items():
        if name in preset.datasets and not path.is_file():
            p.error(f"{name} data {path} not found: pass --{name} PATH (the project ships no copy)")
    out = Path(args.out or ("runs/bench-quick" if args.quick else "results/bench"))
    cache = Path(args.cache) if args.cache else cache_dir("bench")
    summary = run(
        preset,
        out,
        cache,
        data_files,
        sections,
        args.model,
        args.device,
        args.dtype,
        hparams=memit_overrides(vars(args)),
    )
    for dataset, js in summary.items():
        methods = js["methods"]
        line = ", ".join(
            f"{m} {v['score']:.3f}" + (f" ({100 * v['retention']:.1f}%)" if v.get("retention") else "")
            for m, v in methods.items()
            if v.get("score") is not None
        )
        print(f"{dataset}: {line}")
    suffix = suffix_of(next(iter(summary.values()))["config"]["editor"])
    names = ", ".join(f"{d}{suffix}.json" for d in preset.datasets)
    print(f"outputs in {out}/ (README{suffix}.md, {names}, PNG plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
