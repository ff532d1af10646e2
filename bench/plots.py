"""PNG plots of the benchmark (matplotlib, optional: without it the plots are skipped with a note).

- ``clients_<dataset>.png`` (FedLEKE Figure 5): Score and its parts against the number of clients;
- ``slots_<dataset>.png`` (Figure 6): the same against the number of time slots;
- ``merging_<dataset>.png`` (CollabEdit's Figure 1): the same against the edits merged in one round;
- ``sequential_<dataset>.png``: the first slot's edits after every slot, centralised and FedEdit;
- ``sequential_long_<dataset>.png``: the same on the long workload (``sequential_long``);
- ``bytes_per_edit.png``: bytes sent and received per edit, per strategy and data set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fededit_core.eval.tables import SCORE_PARTS

log = logging.getLogger("fededit.bench")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: PNG plots skipped (pip install matplotlib)")
        return None
    return plt


def _curve_plot(plt, rows: list[dict], key: str, kind: str, title: str, path: Path) -> None:
    metrics = ["score", *SCORE_PARTS[kind]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), sharex=True)
    xs = sorted({r[key] for r in rows})
    for ax, metric in zip(axes, metrics):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r[key], r.get(metric)) for r in rows if r["method"] == method and r.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        central = sorted({(r[key], r.get("centralised_score")) for r in rows if r.get("centralised_score")})
        if metric == "score" and central:
            ax.plot(*zip(*central), marker="s", linestyle="--", color="black", label="centralised")
        ax.set_title(metric if metric == "score" else metric.upper())
        ax.set_xlabel(key.replace("_", " "))
        if min(xs) > 0 and max(xs) >= 16 * min(xs):  # e.g. 25 ... 400 edits: evenly spaced doublings
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bytes_plot(plt, all_js: dict[str, dict], path: Path) -> None:
    methods = ["local", "editavg", "editavg-factors", "sa", "ta", "ties", "fededit-noreedit", "fededit", "collabedit"]
    datasets = [d for d, js in all_js.items() if js["methods"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(datasets))
    top = 1.0
    for i, d in enumerate(datasets):
        values = [(all_js[d]["methods"].get(m, {}).get("bytes_per_edit") or 0) / 1e3 for m in methods]
        top = max(top, *values)
        bars = ax.bar([j + i * width for j in range(len(methods))], values, width=width, label=d)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 1 else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks([j + width * (len(datasets) - 1) / 2 for j in range(len(methods))], methods, fontsize=8)
    ax.set_ylabel("KB per edit (up + down)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(0, top * 8)  # room above the tallest bar for its label
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(out: Path, all_js: dict[str, dict], suffix: str = "") -> list[Path]:
    """The PNGs of the module docstring; ``suffix`` names another editor's (``-pmet``)."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for dataset, js in all_js.items():
        for key, x, title in (
            ("clients", "n_clients", "Figure 5: Score vs clients"),
            ("slots", "n_slots", "Figure 6: Score vs time slots"),
            ("merging", "n_edits", "CollabEdit Figure 1: Score vs edits, one round"),
            ("sequential", "slot", "The first slot's edits after every slot"),
            ("sequential_long", "slot", "The first slot's edits after every slot, long workload"),
        ):
            if js.get(key):
                path = out / f"{key}_{dataset}{suffix}.png"
                _curve_plot(plt, js[key], x, js["dataset"], f"{title} ({dataset})", path)
                written.append(path)
    if any(js["methods"] for js in all_js.values()):
        _bytes_plot(plt, all_js, out / f"bytes_per_edit{suffix}.png")
        written.append(out / f"bytes_per_edit{suffix}.png")
    return written
