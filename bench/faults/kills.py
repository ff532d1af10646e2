"""Kill the server at every phase of a time slot, resume, and compare with an uninterrupted run.

Each run is a child process (``python -m bench.faults.kills CONFIG``) running one federation of
the tiny test world (tests/federation_kit.py: 2 clients, 2 slots) through ``run_federation`` with
in-process clients, so a SIGKILL stops the server and its clients together, as a power cut would;
everything that survives is on disk (the server's store, the clients' checkpoints). Kill points,
numbered by the exchanges of the last slot (one exchange = one step sent to every client):
``before`` (no client has it), ``mid`` (the first client did it, the second did not), ``after``
(both did it, the server has not read the replies) and, for the re-edit, ``inside`` (the first
client applied the kept sets but did not write its checkpoint). The killed run is then started
again without a kill and must finish with the uninterrupted run's models, having lost no set and
applied none twice (read from the clients' checkpoints and the store).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

STRATEGIES = ("fededit", "editavg", "collabedit", "local")
WHENS = ("before", "mid", "after")
ROOT = Path(__file__).resolve().parents[2]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingTransport:
    """The in-process transport, numbering its exchanges and killing this process at ``kill``
    (exchange index, when); ``ops`` lists the exchanges seen (step name, slot)."""

    def __init__(self, specs: dict, kill: tuple[int, str] | None):
        from bench.inprocess import InProcessTransport

        self.inner, self.kill, self.ops = InProcessTransport(specs, keep_log=False), kill, []

    def __call__(self, instructions: dict) -> dict:
        index = len(self.ops)
        first = next(iter(instructions.values()))
        self.ops.append((first.op, first.args.get("slot")))
        at = self.kill[1] if self.kill and self.kill[0] == index else None
        if at == "before":
            _die()
        if at == "inside":
            _kill_inside_reedit()
        replies = {}
        for n, (client, instruction) in enumerate(instructions.items()):
            if at == "mid" and n == 1:
                _die()
            replies.update(self.inner({client: instruction}))
        if at == "after":
            _die()
        return replies


def _kill_inside_reedit() -> None:
    """The next re-edit that applies sets dies after applying them, before its checkpoint."""
    import fededit_core.client.participant as participant

    apply = participant.apply_mkvs

    def apply_then_die(editor, mkvs):
        apply(editor, mkvs)
        _die()

    participant.apply_mkvs = apply_then_die


def child(config: dict) -> None:
    """One federation run of the tiny world (the body of a child process)."""
    import torch

    from strategies.federation import run_federation
    from strategies.settings import RunSettings
    from tests.federation_kit import client_specs

    torch.set_num_threads(1)
    world, root = config["world"], Path(config["root"])
    specs = client_specs(world, root, config["run"])
    transport = KillingTransport(specs, tuple(config["kill"]) if config.get("kill") else None)
    settings = RunSettings(
        run=config["run"],
        strategy=config["strategy"],
        num_slots=2,
        alpha=0.0,
        store_path=root / f"{config['run']}.sqlite",
        baseline=False,
    )
    report = run_federation(transport, list(specs), settings, {}, progress=False)
    Path(config["out"]).write_text(json.dumps({"ops": transport.ops, "report": report}))


def run_child(config: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDEDIT_CACHE": config["world"]["cache"]}
    return subprocess.run(
        [sys.executable, "-m", "bench.faults.kills", json.dumps(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def client_state(root: Path, run: str) -> dict[str, dict]:
    """Each client's final layers and audit trail (from its checkpoint, not the last good one
    kept beside it)."""
    out = {}
    for folder in sorted((root / "state" / run).iterdir()):
        if folder.name.endswith(".prev") or not (folder / "state.json").is_file():
            continue
        state = json.loads((folder / "state.json").read_text())
        out[folder.name] = {
            "layers": load_file(str(folder / "layers.safetensors")),
            "reedited": state["reedited_ids"],
            "merged": state.get("merged_slots", []),
            "edited": [r["slot"] for r in state["reports"]],
        }
    return out


def compare(reference: dict[str, dict], resumed: dict[str, dict]) -> dict:
    """Largest relative weight difference, and sets (received MKVs, merges, own slots) lost or
    applied twice, of the resumed clients against the uninterrupted ones."""
    diff, lost, twice = 0.0, 0, 0
    for client, ref in reference.items():
        got = resumed.get(client)
        if got is None:
            lost += len(ref["reedited"]) + len(ref["merged"]) + len(ref["edited"])
            continue
        for name, w in ref["layers"].items():
            d = float(np.linalg.norm(got["layers"][name].astype(np.float64) - w) / max(np.linalg.norm(w), 1e-30))
            diff = max(diff, d)
        for key in ("reedited", "merged", "edited"):
            lost += len(set(ref[key]) - set(got[key]))
            twice += len(got[key]) - len(set(got[key]))
    return {"max_weight_diff_vs_uninterrupted": diff, "sets_lost": lost, "sets_applied_twice": twice}


def kill_points(ops: list) -> list[tuple[int, str]]:
    """Every kill point of the last slot's exchanges (``inside`` for its re-edit)."""
    last = max(slot for _, slot in ops if slot is not None)
    start = next(i for i, (_, slot) in enumerate(ops) if slot == last)
    end = next(i for i, (op, _) in enumerate(ops) if op == "evaluate")
    points = []
    for index in range(start, end):
        points += [(index, when) for when in WHENS]
        if ops[index][0] == "reedit":
            points.append((index, "inside"))
    return points


def run_strategy(strategy: str, world: dict, root: Path, only: list[str] | None = None, log=print) -> list[dict]:
    """The uninterrupted run, then one killed-and-resumed run per kill point of the last slot."""
    out = root / f"{strategy}-reference.json"
    done = run_child(
        {"world": world, "root": str(root), "run": f"{strategy}-ref", "strategy": strategy, "out": str(out)}
    )
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted {strategy} run failed:\n{done.stderr[-3000:]}")
    ops = json.loads(out.read_text())["ops"]
    reference = client_state(root, f"{strategy}-ref")
    rows = []
    for index, when in kill_points(ops):
        label = f"{ops[index][0]}#{index}:{when}"
        if only and not any(label.startswith(o) or o == when for o in only):
            continue
        run = f"{strategy}-{index}-{when}"
        base = {"world": world, "root": str(root), "run": run, "strategy": strategy, "out": str(root / f"{run}.json")}
        killed = run_child({**base, "kill": [index, when]})
        resumed = run_child(base)
        row = {
            "strategy": strategy,
            "kill_at": label,
            "killed": killed.returncode == -signal.SIGKILL,
            "completed": resumed.returncode == 0,
        }
        if resumed.returncode == 0:
            row.update(compare(reference, client_state(root, run)))
        else:
            row["error"] = resumed.stderr[-2000:]
        log(json.dumps({k: v for k, v in row.items() if k != "error"}))
        rows.append(row)
    return rows


def prepare_world(root: Path) -> dict:
    """The tiny world under ``root``, with a cache of its own for the child runs (C0 is computed
    once, by the uninterrupted run, and shared)."""
    from tests.federation_kit import tiny_world

    return {**tiny_world(root), "cache": str(root / "cache")}


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
