"""A tiny federation for tests: a saved tiny Llama, a corpus, request files, in-process clients.

``DirectTransport`` delivers a strategy's instructions straight to an ``EditWorker`` (the same
worker the ClientApp uses), so the strategies run end to end in seconds without Flower.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.inprocess import InProcessTransport
from fededit_core.client.worker import ClientSpec
from tests.tiny import tiny_model_with_words

WORDS = (" Rome", " Paris", " Berlin", " London")
SUBJECTS = [
    "Eiffel Tower",
    "Colosseum",
    "Big Ben",
    "Louvre",
    "Brandenburg Gate",
    "Tower Bridge",
    "Pantheon",
    "Reichstag",
]
TINY_HPARAMS = {"cov_samples": 16, "v_steps": 5, "mom2_weight": 10.0}


def request_record(i: int, subject: str, client: str | None = None) -> dict:
    new, true = WORDS[i % 4].strip(), WORDS[(i + 1) % 4].strip()
    record = {
        "case_id": f"c{i}",
        "subject": subject,
        "prompt": "The {} is in",
        "target_new": new,
        "target_true": true,
        "paraphrase_prompts": [f"Where is the {subject}? In"],
        "neighborhood_prompts": ["The Museum is in"],
    }
    if client:
        record["client"] = client
    return record


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@contextmanager
def isolated_tiny_world(tmp_path_factory, name: str):
    """``tiny_world`` under a fresh folder, with FEDEDIT_CACHE inside it while the block runs; the
    world with its ``root``."""
    root = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDEDIT_CACHE", str(root / "cache"))
    try:
        yield {**tiny_world(root), "root": root}
    finally:
        mp.undo()


def tiny_world(root: Path) -> dict:
    """Model folder, corpus file and a 2-client data file (4 requests each, ``client`` field) under ``root``."""
    model, tok = tiny_model_with_words("llama", words=WORDS, head_scale=50.0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = "the a of city tower river king queen museum old new bridge gate language".split()
    (root / "corpus.txt").write_text(
        "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(30)) for i in range(40))
    )
    data = write_jsonl(root / "data.jsonl", [request_record(i, s, f"client-{i % 2}") for i, s in enumerate(SUBJECTS)])
    hparams = {**TINY_HPARAMS, "cov_source": str(root / "corpus.txt")}
    return {"model": str(root / "model"), "corpus": str(root / "corpus.txt"), "data": str(data), "hparams": hparams}


# The tiny model's target NLLs (~36 nats) move by several nats under any update, so the rollback
# check (a SmolLM2-scale margin) is off here, and so is the check of reused z (its optimisation
# stops far below SmolLM2's probabilities): these tests check the protocol, tests/test_defences.py
# and tests/test_participant.py the defences. The clients may upload plaintext MKVs (the runs of
# ``seal_mkvs=False``); tests/test_sealed_federation.py checks that a client refuses to by default.
def client_specs(
    world: dict, root: Path, run: str, n_clients: int = 2, num_slots: int = 2, data: str | None = None, **overrides
) -> dict[str, ClientSpec]:
    return {
        f"client-{i}": ClientSpec(
            run=run,
            name=f"client-{i}",
            model=world["model"],
            hparams=world["hparams"],
            requests=data or world["data"],
            partition="field",
            count=n_clients,
            num_slots=num_slots,
            state_dir=str(root / "state"),
            oracle=True,
            **{
                "secret_file": str(root / "secret"),
                "rollback_margin": None,
                "reuse_min_prob": 0.0,
                "allow_plaintext_mkvs": True,
                **overrides,
            },
        )
        for i in range(n_clients)
    }


DirectTransport = InProcessTransport  # instructions straight to in-process workers, all kept in ``log``
