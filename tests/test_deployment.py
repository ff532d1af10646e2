"""Deployment on loopback, through the deploy/ scripts: a SuperLink with TLS and SuperNode
authentication, two registered SuperNodes each with its own edit worker (a tiny random Llama), a
federated edit with ``flwr run``; a SuperNode with an unregistered key is refused; a ClientApp whose
worker is down fails fast with a clear error. Every process started is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from client_app.worker_service import RemoteWorker, WorkerUnavailable
from deploy.loopback import Loopback, free_port
from tests.tiny import tiny_model_with_words

CLIENTS = ("hospital-a", "hospital-b")
LANDMARKS = [
    ("Eiffel Tower", "Paris", "Rome"),
    ("Colosseum", "Rome", "Berlin"),
    ("Big Ben", "London", "Paris"),
    ("Brandenburg Gate", "Berlin", "London"),
    ("Louvre", "Paris", "London"),
    ("Pantheon", "Rome", "Paris"),
    ("Tower Bridge", "London", "Berlin"),
    ("Reichstag", "Berlin", "Rome"),
]


def write_requests(path: Path, rows: list[tuple[str, str, str]], first: int) -> None:
    with path.open("w") as f:
        for i, (subject, true, new) in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "case_id": f"c{first + i}",
                        "subject": subject,
                        "prompt": "The {} is in",
                        "target_new": new,
                        "target_true": true,
                        "paraphrase_prompts": [f"Where is the {subject}? In"],
                        "neighborhood_prompts": [
                            "The Louvre is in" if subject != "Louvre" else "The Eiffel Tower is in"
                        ],
                    }
                )
                + "\n"
            )


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Tiny model, corpus and private request files; the loopback federation, up, then down."""
    missing = [tool for tool in ("openssl", "ssh-keygen", "setsid", "pgrep") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"deployment needs {', '.join(missing)}")
    data = tmp_path_factory.mktemp("data")
    model, tok = tiny_model_with_words("llama", words=(" Rome", " Paris", " Berlin", " London"), head_scale=50.0)
    model.save_pretrained(data / "model")
    tok.save_pretrained(data / "model")
    rng = random.Random(0)
    vocab = "the of and a to in is was for on that with as by at from his her it an were are this be".split()
    (data / "corpus.txt").write_text("\n".join(" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(50)))
    requests = {}
    for k, name in enumerate(CLIENTS):
        requests[name] = data / f"{name}.jsonl"
        write_requests(requests[name], LANDMARKS[4 * k : 4 * k + 4], 4 * k)
    fed = Loopback(tmp_path_factory.mktemp("fed"), str(data / "model"), requests, device="cpu")
    fed.data = data
    try:
        fed.up(worker_timeout=240)
        yield fed
    finally:
        fed.down()
        patterns = [str(fed.root), *(f"127.0.0.1:{port}" for port in (fed.port, *fed.node_ports.values()))]
        pgrep = [subprocess.run(["pgrep", "-f", p], capture_output=True, text=True, check=False) for p in patterns]
        left = [pid for proc in pgrep for pid in proc.stdout.split()]
        assert not left, f"processes left behind: {left}"


@pytest.mark.deploy
def test_unregistered_supernode_is_refused(federation, tmp_path):
    """A SuperNode whose key the SuperLink does not know may not join: it exits with an error."""
    key = tmp_path / "keys" / "intruder"
    federation.script("make_node_key.sh", key.parent, key.name)
    log = tmp_path / "intruder.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                "flower-supernode",
                "--superlink",
                federation.address,
                "--port",
                str(free_port()),
                "--root-certificates",
                str(federation.certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(key),
                "--node-config",
                f'name="intruder" worker="unix:{tmp_path}/none.sock" requests="{tmp_path}/none.jsonl"',
            ],
            env=federation.env(FLWR_HOME=str(tmp_path / "flwr")),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc != 0, text
    assert "Failed to activate SuperNode" in text, text
    assert "No SuperNode found with the given public key" in federation.log("superlink")


@pytest.mark.deploy
def test_federated_edit_over_tls(federation):
    tmp = federation.root
    run_config = (
        f"model='{federation.model}' cov-source='{federation.data / 'corpus.txt'}' cov-samples=16 "
        f"v-steps=5 mom2-weight=10.0 num-slots=2 centralised=false min-clients=2 "
        f"output-dir='{tmp / 'runs'}' run-name='deploytest'"
    )
    started = time.monotonic()
    proc = federation.run(run_config, timeout=480)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    report_path = tmp / "runs" / "deploytest" / "report.json"
    assert report_path.exists(), output + "\n" + federation.log("superlink")[-5000:]
    report = json.loads(report_path.read_text())
    assert report["strategy"] == "fededit"
    assert sorted(c["client"] for c in report["clients"]) == sorted(CLIENTS)
    for client in report["clients"]:
        assert not client["failed"], client
        assert client["n"] == 4 and client["own"] is not None and "score" in client["own"], client
        assert client["bytes_sent"] > 0 and client["bytes_received"] > 0, client
    # the edit ran in each organisation's worker: its checkpoints, and the model it loaded for the run
    for name in CLIENTS:
        folder = federation.state / name / "deploytest" / name
        assert folder.is_dir() and any(folder.iterdir()), f"no checkpoint of {name} in {folder}"
        assert federation.log(f"worker-{name}").count(f"loading {federation.model}") >= 1
    assert "report:" in output, output
    print(f"flwr run took {time.monotonic() - started:.0f} s")


@pytest.mark.deploy
def test_collabedit_with_secagg_plus_over_tls(federation):
    """CollabEdit's sums through SecAgg+ between real processes (the mod keeps its keys in the
    SuperNode's per-run state across ClientApp processes): both organisations end with one model."""
    from safetensors.torch import load_file

    tmp = federation.root
    run_config = (
        f"model='{federation.model}' cov-source='{federation.data / 'corpus.txt'}' cov-samples=16 "
        f"v-steps=5 mom2-weight=10.0 num-slots=1 centralised=false min-clients=2 strategy='collabedit' "
        f"secure-aggregation=true collab-transport='dense' output-dir='{tmp / 'runs'}' run-name='deploysecagg'"
    )
    proc = federation.run(run_config, timeout=480)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    report = json.loads((tmp / "runs" / "deploysecagg" / "report.json").read_text())
    assert report["strategy"] == "collabedit"
    assert all(not c["failed"] and c["n"] == 4 for c in report["clients"]), report["clients"]
    assert "Secure aggregation completed" in output + federation.log("superlink"), output[-3000:]
    layers = [
        load_file(str(federation.state / name / "deploysecagg" / name / "layers.safetensors")) for name in CLIENTS
    ]
    assert layers[0].keys() == layers[1].keys() and all(torch.equal(layers[0][k], layers[1][k]) for k in layers[0])


@pytest.mark.deploy
def test_clientapp_with_its_worker_down_fails_fast():
    """The health check the ClientApp makes before every step: a clear error within its timeout."""
    started = time.monotonic()
    with pytest.raises(WorkerUnavailable) as err:
        RemoteWorker("unix:/nonexistent.sock").health(timeout=1)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "edit worker at unix:/nonexistent.sock is not answering" in message
    assert "fededit-worker --address unix:/nonexistent.sock" in message


@pytest.mark.deploy
def test_clientapp_step_reports_a_down_worker(monkeypatch):
    """The ClientApp replies at once with the worker's error, which the server reports as this client's failure."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client_app.app import _step
    from wire.messages import Limits, pack, unpack

    for attr in ("_run_id", "_node_id", "_task_id"):  # set by Flower in a ClientApp process; a Message needs them
        monkeypatch.setattr(TaskIdentity, attr, 1)
    node_config = {"name": "hospital-a", "worker": "unix:/nonexistent.sock", "requests": "/nonexistent.jsonl"}
    context = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={"model": "tiny", "num-slots": 1}
    )
    for op in ("whoami", "hello"):
        started = time.monotonic()
        reply = _step(Message(pack({"op": op}, {}), dst_node_id=7, message_type="query"), context)
        body, _ = unpack(reply.content, Limits(max_message_bytes=1 << 20))
        assert time.monotonic() - started < 10
        assert body["error"].startswith("WorkerUnavailable: edit worker at unix:/nonexistent.sock is not answering")


def test_free_port_never_hands_out_one_port_twice(monkeypatch):
    """A federation draws all its ports before any server binds: the same free port drawn twice would
    give the SuperLink and a SuperNode one port (seen in CI: 'address already in use')."""
    import deploy.loopback as loopback

    draws = iter([23001, 23001, 23002])  # the second draw repeats the first

    class Draws:
        def randrange(self, low, high):
            return next(draws)

    monkeypatch.setattr(loopback, "_HANDED_OUT", set())
    monkeypatch.setattr(loopback.random, "SystemRandom", Draws)
    monkeypatch.setattr(loopback, "_ephemeral_start", lambda: 32768)
    assert [loopback.free_port(), loopback.free_port()] == [23001, 23002]
