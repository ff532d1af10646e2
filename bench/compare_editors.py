"""The editors side by side, from the benchmark's outputs (``bench.reproduce`` once per ``--editor``).

    python -m bench.compare_editors --out results/bench

Reads ``<dataset>.json`` (MEMIT) and ``<dataset>-<editor>.json`` from ``--out`` and writes there:

- ``editors.md``: per editor and data set, the centralised Score and each federated method's Score
  as a percentage of its own editor's centralised run (the FedLEKE paper's retention); then the
  Score of the first slot's edits after every slot, per editor: the ``sequential`` section
  (centralised and FedEdit) and the long workload's ``sequential_long``;
- ``sequential_editors.png``, ``sequential_long_editors.png``: those forgetting curves as plots.

Only what was run is shown: an editor or a section without outputs is left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fededit_core.io import atomic_write
from fededit_core.memit.hparams import EDITORS

from .plots import _pyplot
from .reproduce import PRESETS
from .tables import SEQUENTIAL_SECTIONS, suffix_of

DATASETS = ("counterfact", "zsre")
FEDERATED = PRESETS["default"].editor_methods  # the rows every editor's main table has


def load(out: Path) -> dict[str, dict[str, dict]]:
    """``{editor: {dataset: json}}`` of the outputs present in ``out``."""
    found: dict[str, dict[str, dict]] = {}
    for editor in EDITORS:
        for dataset in DATASETS:
            path = out / f"{dataset}{suffix_of(editor)}.json"
            if path.is_file():
                found.setdefault(editor, {})[dataset] = json.loads(path.read_text())
    return found


def retention_table(found: dict) -> str:
    lines = ["| editor | data set | centralised | " + " | ".join(FEDERATED) + " |", "|---" * (3 + len(FEDERATED)) + "|"]
    for editor, by_dataset in found.items():
        for dataset, js in by_dataset.items():
            methods = js.get("methods", {})
            if "centralised" not in methods:
                continue
            cells = []
            for m in FEDERATED:
                r = methods.get(m)
                cells.append("-" if r is None else f"{r['score']:.3f} ({100 * r['retention']:.1f}%)")
            lines.append(
                f"| {editor} | {dataset} | {methods['centralised']['score']:.3f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def sequential_rows(found: dict, section: str = "sequential") -> list[dict]:
    """``{editor, method, slot, score}`` of every editor's CounterFact ``section`` (a sequential one)."""
    return [
        {"editor": editor, **row}
        for editor, by_dataset in found.items()
        for row in by_dataset.get("counterfact", {}).get(section) or []
    ]


def sequential_table(rows: list[dict]) -> str:
    curves = sorted({(r["editor"], r["method"]) for r in rows})
    by = {(r["editor"], r["method"], r["slot"]): r["score"] for r in rows}
    slots = sorted({r["slot"] for r in rows})
    head = "| after slot | " + " | ".join(f"{e} {m}" for e, m in curves) + " |"
    lines = [head, "|---" * (1 + len(curves)) + "|"]
    for t in slots:
        cells = [by.get((e, m, t)) for e, m in curves]
        lines.append(f"| {t} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def sequential_plot(rows: list[dict], path: Path) -> bool:
    plt = _pyplot()
    if plt is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for editor, method in sorted({(r["editor"], r["method"]) for r in rows}):
        pts = sorted((r["slot"], r["score"]) for r in rows if (r["editor"], r["method"]) == (editor, method))
        ax.plot(*zip(*pts), marker="o", linestyle="--" if method == "centralised" else "-", label=f"{editor} {method}")
    ax.set_xlabel("after slot")
    ax.set_ylabel("Score of slot 1's edits")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_editors", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/bench", help="the benchmark's output folder (read and written)")
    args = p.parse_args(argv)
    out = Path(args.out)
    found = load(out)
    if not found:
        p.error(f"no benchmark outputs in {out}: run python -m bench.reproduce [--editor NAME] first")
    parts = ["# Editors side by side", "", "## Main tables: Score (% of the editor's centralised run)", ""]
    parts += [retention_table(found), ""]
    for section in SEQUENTIAL_SECTIONS:
        rows = sequential_rows(found, section)
        if not rows:
            continue
        title = f"## The first slot's edits after every slot (CounterFact, the `{section}` section)"
        parts += [title, "", sequential_table(rows), ""]
        if sequential_plot(rows, out / f"{section}_editors.png"):
            parts += [f"![first slot's edits]({section}_editors.png)", ""]
    text = "\n".join(parts)
    atomic_write(out / "editors.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
