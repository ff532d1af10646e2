"""A poisoning member against the default job: ``python -m bench.faults.poisoning --json OUT``.

The default job's run settings (``RunSettings()``: FedEdit on SmolLM2-135M, the 24 built-in edits
over 4 clients, 3 time slots, alpha and vector as configured) run through ``run_federation`` with
in-process clients (``bench/inprocess.py``: the worker steps a ClientApp runs, without Flower).
In the attacked runs ``client-3`` is an organisation that crafts its uploads (``Attacker``):

- it declares ``DECLARED`` requests per slot in its hello (the server cannot check a count);
- from slot 1 on, its upload holds near-copies (relative noise ``NOISE``, so they are not
  replays) of every MKV it was served before, so that each victim's own vectors find their best
  match in the set and Eq. 8's ``set`` rule on delta keeps it (``ATTACKED_GATE``, the rule this
  attack is built against: the runs use it; the default ``paper`` rule keeps each vector on its own
  and drops the pushed-back ones without any defence), plus, per victim, ``REPEAT`` near-copies of one vector that
  pushes that victim's newest fact back (repeated, they outweigh the copy of the fact's own z at
  the same key in MEMIT's least squares): ``delta' = -s delta``, ``z' = h - s delta`` at the victim's own keys, with ``s``
  the largest that keeps the shift bound ``|delta'| <= c (c + 2) |h|`` (fedleke/bounds.py), so the
  server's and the receivers' bounds pass it.

The crafted vector pushes the fact back as far as the bounds allow (``pushback``), or only undoes
it (``undo``: s = 0, z' = h, the smallest shift that erases it). Runs, each scored on the victims'
(clients 0-2) own requests: no attacker with defences off and on, and each attack with defences off
and on; ``victim_score_clean`` (no attacker, defences off), ``victim_score_undefended`` and
``victim_score_defended`` (the attack that moves the defended victims most) and
``clean_score_defences_on``.
Defences off: no rollback (``rollback-margin`` < 0) and reused z taken unchecked
(``reuse_min_prob`` 0); on: the defaults. The bounds stay on in every run (the attack keeps them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.inprocess import InProcessTransport
from client_app.app import simulation_spec
from fededit_core.client.worker import EditWorker
from fededit_core.fedleke.bounds import shift_limit
from fededit_core.fedleke.mkv import WIRE_ARRAYS
from fededit_core.io import atomic_write
from strategies.federation import run_federation
from strategies.report import weighted
from strategies.session import Instruction, Reply
from strategies.settings import RunSettings

N_CLIENTS = 4  # the default job's (deploy/simulate.py --clients)
ATTACKER = "client-3"
DECLARED = 32  # requests per slot the attacker claims, room for its crafted sets
NOISE = 1e-3  # relative noise on the copied vectors
REPEAT = 4  # copies of each pushed-back vector
ATTACKED_GATE = {"gate": "set", "vector": "delta", "alpha": 0.22}  # the rule the crafted sets pass
BOUND_USE = 0.98  # fraction of the shift bound the pushed-back vector uses
# what the crafted vector does to the victim's newest fact: push it back as far as the bounds allow,
# or undo it (z' = h, s = 0: the fact erased with the smallest shift)
ATTACKS = ("pushback", "undo")


class Attacker:
    """A transport that lets ``ATTACKER``'s worker run honestly and rewrites what it sends."""

    def __init__(self, inner: InProcessTransport, attack: str = "pushback", seed: int = 0):
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {list(ATTACKS)}, got {attack!r}")
        self.inner, self.attack, self.rng = inner, attack, np.random.default_rng(seed)
        self.served: dict[str, list[dict[str, np.ndarray]]] = {}  # victim -> rows it was served, in order
        self.clamp = 0.0

    def __call__(self, instructions: dict[str, Instruction]) -> dict[str, Reply]:
        replies = self.inner(instructions)
        ins, reply = instructions.get(ATTACKER), replies.get(ATTACKER)
        if ins is None or reply is None or reply.error:
            return replies
        body = dict(reply.body)
        if ins.op == "hello":
            self.clamp = float(body["hparams"]["clamp_norm_factor"])
            n = len(body["slot_sizes"])
            body.update(slot_sizes=[DECLARED] * n, n_requests=DECLARED * n)
        elif ins.op == "tags":
            body["tags"] = list(body["tags"]) + [None] * (DECLARED - len(body["tags"]))
        elif ins.op == "reedit":
            for i, sender in enumerate(ins.args["senders"]):
                row = {k: np.asarray(ins.arrays[k][i], np.float32) for k in WIRE_ARRAYS}
                self.served.setdefault(sender, []).append(row)
        elif ins.op == "edit" and self.served:
            slot = ins.args["slot"]
            rows = self._crafted()
            body.update(ids=[f"{ATTACKER}/{slot}/{i}" for i in range(len(rows))], tags=[""] * len(rows))
            body["refused_reuse"] = []
            arrays = {k: np.stack([r[k] for r in rows]) for k in WIRE_ARRAYS}
            arrays["layers"] = reply.arrays["layers"]
            replies[ATTACKER] = Reply(ATTACKER, body, arrays)
            return replies
        replies[ATTACKER] = Reply(ATTACKER, body, reply.arrays)
        return replies

    def _noisy(self, x: np.ndarray) -> np.ndarray:
        scale = NOISE * np.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(x.shape[-1])
        return (x + scale * self.rng.standard_normal(x.shape)).astype(np.float32)

    def _crafted(self) -> list[dict[str, np.ndarray]]:
        rows = []
        for got in self.served.values():
            for r in got:
                rows.append({k: self._noisy(v) for k, v in r.items()})
            newest = got[-1]
            h = newest["z"] - newest["delta"]
            s = BOUND_USE * shift_limit(self.clamp) * np.linalg.norm(h) / np.linalg.norm(newest["delta"])
            s = s if self.attack == "pushback" else 0.0
            pushed = {
                "z": h - s * newest["delta"],
                "delta": -s * newest["delta"],
                "keys": newest["keys"],
                "corrections": np.zeros_like(newest["corrections"]),
            }
            rows += [{k: self._noisy(v) for k, v in pushed.items()} for _ in range(REPEAT)]
        return rows[:DECLARED]


def run_once(root: Path, name: str, attack: str | None, defended: bool, worker: EditWorker) -> dict:
    """One default job (``attack``: None, or the attacker's kind); the victims' own Score and sets."""
    settings = RunSettings(
        run=name,
        centralised=False,
        output_dir=str(root / "runs"),
        rollback_margin=RunSettings().rollback_margin if defended else -1.0,
        seal_mkvs=False,  # the attacker is a member: it could open sealed sets too; plaintext is simpler to craft
        **ATTACKED_GATE,
    )
    off = {} if defended else {"reuse_min_prob": 0.0}
    specs = {
        spec.name: spec
        for spec in (simulation_spec(settings, i, N_CLIENTS, str(root / "secret"), **off) for i in range(N_CLIENTS))
    }
    inner = InProcessTransport(specs, worker=worker, keep_log=False)
    transport = Attacker(inner, attack) if attack else inner
    started = time.perf_counter()
    report = run_federation(transport, list(specs), settings, settings.run_config(), progress=False)
    victims = [c for c in report["clients"] if c["client"] != ATTACKER]
    score = weighted([(c["n"], c["own"]) for c in victims], report["kind"])
    return {
        "victims_own": score,
        "victims": {
            c["client"]: {
                "score": (c["own"] or {}).get("score"),
                "received_sets": c["received_sets"],
                "kept_sets": c["kept_sets"],
                "refused_sets": c["refused_sets"],
                "failed": c["failed"],
            }
            for c in victims
        },
        "refused_senders": report["server"].get("refused_senders", {}),
        "seconds": round(time.perf_counter() - started, 1),
    }


def measure(attacks: tuple[str, ...] = ATTACKS) -> dict:
    """Clean runs with defences off and on, every attack with defences off and on. The top-level
    figures are the clean ones and those of the attack that moves the defended victims most."""
    plan = [("clean", None, False), ("clean", None, True)]
    plan += [(attack, attack, defended) for attack in attacks for defended in (False, True)]
    worker, runs = EditWorker(), {}
    with tempfile.TemporaryDirectory(prefix="fededit-poisoning-") as folder:
        for label, attack, defended in tqdm(plan, desc="poisoning runs"):
            name = f"{label}-{'defended' if defended else 'undefended'}"
            runs[name] = run_once(Path(folder), name, attack, defended, worker)
    score = {name: run["victims_own"]["score"] for name, run in runs.items()}
    clean = score["clean-undefended"]
    moved = {a: (clean - score[f"{a}-defended"], clean - score[f"{a}-undefended"]) for a in attacks}
    worst = max(attacks, key=lambda a: moved[a])
    return {
        "victim_score_clean": clean,
        "victim_score_undefended": score[f"{worst}-undefended"],
        "victim_score_defended": score[f"{worst}-defended"],
        "clean_score_defences_on": score["clean-defended"],
        "worst_attack": worst,
        "moved": {a: {"defended": d, "undefended": u} for a, (d, u) in moved.items()},
        "attacker": ATTACKER,
        "runs": runs,
    }


def summary(result: dict) -> str:
    lines = [f"{name:22s} victims' own Score {run['victims_own']['score']:.3f}" for name, run in result["runs"].items()]
    for attack, moved in result["moved"].items():
        lines.append(f"{attack}: moved {moved['undefended']:.3f} undefended, {moved['defended']:.3f} defended")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    args = parser.parse_args()
    result = measure(tuple(args.attacks))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(result, indent=1))
    print(summary(result))


if __name__ == "__main__":
    main()
