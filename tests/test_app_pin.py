"""A node that pins its app bundle by sha256 (client_app/pinned.py, start_node.sh --app-hash).

The fast tests drive the gate with real bundles built by Flower's own ``flwr build`` code: an
unpinned bundle, or one whose stated hash or app id is not its content's, is refused and never
reaches Flower's installer. The ``deploy`` test runs two pinned SuperNodes on loopback (TLS, node
authentication): the one pinned to this checkout's bundle answers, the one pinned to another hash
refuses the task before unpacking anything.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from client_app import pinned
from deploy.loopback import CONNECTION, DEPLOY, PROJECT, Loopback


def build_fab(folder: Path, name: str = "pinapp", version: str = "1.0.0") -> bytes:
    """The bytes of a small Flower app's bundle, as ``flwr build`` / ``flwr run`` make them."""
    from flwr.cli.build import build_fab_from_disk

    app = folder / name
    (app / name).mkdir(parents=True)
    (app / name / "__init__.py").write_text("")
    (app / name / "client.py").write_text("raise SystemExit('the bundle ran')\n")
    (app / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\n\n'
        '[tool.flwr.app]\npublisher = "test"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "{name}.client:app"\nclientapp = "{name}.client:app"\n'
    )
    return build_fab_from_disk(app)


@dataclass
class FakeRun:
    run_id: int
    fab_id: str
    fab_version: str
    fab_hash: str


@dataclass
class FakeFab:
    hash_str: str
    content: bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Task:
    """What Flower's pull returns, and a record of what reached Flower's installer."""

    def __init__(self, content: bytes, stated: str | None = None, app=("test/pinapp", "1.0.0")):
        digest = sha(content)
        self.fab = FakeFab(stated or digest, content)
        self.run = FakeRun(7, *app, stated or digest)
        self.installed: list[bytes] = []

    def gate(self, accepted: set[str]) -> pinned.Gate:
        return pinned.Gate(
            frozenset(accepted),
            pull=lambda client: ("message", "context", self.run, self.fab),
            install=lambda fab_file, **kw: self.installed.append(fab_file) or Path("/installed"),
        )


def test_parse_hashes():
    h = sha(b"a")
    assert pinned.parse_hashes(f" {h.upper()}, {sha(b'b')} ") == {h, sha(b"b")}
    for bad in ("", "abc", h[:-1], h + "0", "g" * 64):
        with pytest.raises(ValueError):
            pinned.parse_hashes(bad)


def test_gate_installs_the_pinned_bundle(tmp_path):
    task = Task(build_fab(tmp_path))
    gate = task.gate({sha(task.fab.content)})
    message, context, run, fab = gate.pull(client=None)
    assert gate.install(fab.content, skip_prompt=True) == Path("/installed")
    assert task.installed == [task.fab.content]


def test_gate_refuses_an_unpinned_bundle_before_installing(tmp_path):
    task = Task(build_fab(tmp_path))
    gate = task.gate({sha(b"the bundle the node accepts")})
    gate.pull(client=None)
    with pytest.raises(pinned.UntrustedApp, match=f"app bundle sha256 {sha(task.fab.content)} is not pinned"):
        gate.install(task.fab.content, skip_prompt=True)
    assert task.installed == []


def test_gate_refuses_a_misstated_bundle(tmp_path):
    """Flower loads the app from the folder named by the stated hash and app id: they must be the content's."""
    content = build_fab(tmp_path)
    for task in (Task(content, stated=sha(b"other")), Task(content, app=("test/other", "1.0.0"))):
        gate = task.gate({sha(content), sha(b"other")})
        gate.pull(client=None)
        with pytest.raises(pinned.UntrustedApp):
            gate.install(content, skip_prompt=True)
        assert task.installed == []


def test_gate_installs_only_the_checked_bytes(tmp_path):
    first, second = build_fab(tmp_path / "1"), build_fab(tmp_path / "2", version="2.0.0")
    task = Task(first)
    gate = task.gate({sha(first), sha(second)})
    with pytest.raises(pinned.UntrustedApp, match="no task pulled"):
        gate.install(first)
    gate.pull(client=None)
    with pytest.raises(pinned.UntrustedApp, match="not the one checked"):
        gate.install(second)
    assert task.installed == []


def test_install_gate_wraps_flowers_clientapp_runner(monkeypatch):
    import flwr.supernode.runtime.run_clientapp as runner

    monkeypatch.setattr(runner, "pull_task_input", runner.pull_task_input)
    monkeypatch.setattr(runner, "install_from_fab", runner.install_from_fab)
    gate = pinned.install_gate(frozenset({sha(b"x")}))
    assert runner.pull_task_input == gate.pull and runner.install_from_fab == gate.install
    with pytest.raises(pinned.UntrustedApp):
        runner.install_from_fab(b"any bundle", skip_prompt=True)


def test_superexec_starts_fededit_clientapp_for_every_task(monkeypatch):
    import flwr.supercore.cli
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    for task_type, command in list(TASK_TYPE_TO_COMMAND.items()):
        monkeypatch.setitem(TASK_TYPE_TO_COMMAND, task_type, command)
    seen = {}
    monkeypatch.setattr(flwr.supercore.cli, "flower_superexec", lambda: seen.setdefault("argv", list(pinned.sys.argv)))
    monkeypatch.delenv(pinned.ENV, raising=False)
    monkeypatch.setattr(pinned.sys, "argv", ["fededit-superexec"])
    h = sha(b"bundle")
    pinned.superexec_main(["--app-hash", h, "--runtime-api-address", "127.0.0.1:1", "--insecure"])
    assert pinned.os.environ.pop(pinned.ENV) == h
    assert seen["argv"][1:] == ["--runtime-api-address", "127.0.0.1:1", "--insecure"]
    assert {Path(c).name for c in TASK_TYPE_TO_COMMAND.values()} == {"fededit-clientapp"}
    with pytest.raises(SystemExit):
        pinned.superexec_main(["--runtime-api-address", "127.0.0.1:1"])  # no pin
    with pytest.raises(SystemExit):
        pinned.superexec_main(["--app-hash", h, "--executor", "kubernetes", "--runtime-api-address", "x"])


def test_clientapp_without_a_pin_exits(monkeypatch):
    monkeypatch.delenv(pinned.ENV, raising=False)
    with pytest.raises(SystemExit, match="FEDEDIT_APP_HASH"):
        pinned.clientapp_main()


def app_hash(app: Path) -> str:
    """deploy/app_hash.sh APP: the sha256 of the bundle that ``flwr run APP`` uploads."""
    proc = subprocess.run(["bash", str(DEPLOY / "app_hash.sh"), str(app)], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def project_snapshot(folder: Path) -> Path:
    """The files of this checkout's bundle, unpacked into ``folder/fededit``: a tree that does not
    change while the test runs (someone may be editing the checkout)."""
    from flwr.cli.build import build_fab_from_disk

    app = folder / "fededit"
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT))) as fab:
        fab.extractall(app)
    shutil.rmtree(app / ".info")
    return app


@pytest.mark.deploy
def test_pinned_nodes_on_loopback(tmp_path):
    """hospital-a pins this checkout's bundle, hospital-b another one: only hospital-a takes part."""
    missing = [tool for tool in ("openssl", "ssh-keygen", "setsid", "pgrep") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"deployment needs {', '.join(missing)}")
    from tests.test_deployment import LANDMARKS, write_requests
    from tests.tiny import tiny_model_with_words

    model, tok = tiny_model_with_words("llama", words=(" Rome", " Paris"))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    requests = {}
    for k, name in enumerate(("hospital-a", "hospital-b")):
        requests[name] = tmp_path / f"{name}.jsonl"
        write_requests(requests[name], LANDMARKS[2 * k : 2 * k + 2], 2 * k)
    app = project_snapshot(tmp_path)
    ours, other = app_hash(app), sha(b"another bundle")
    fed = Loopback(
        tmp_path / "fed", str(tmp_path / "model"), requests, app_hashes={"hospital-a": ours, "hospital-b": other}
    )
    try:
        fed.up(worker_timeout=240)
        run_config = "centralised=false min-clients=2 wait-clients-s=30 step-timeout-s=120"
        proc = subprocess.run(
            ["flwr", "run", str(app), CONNECTION, "--stream", "--run-config", run_config],
            cwd=app,
            env=fed.env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = proc.stdout + proc.stderr
        refused = fed.log("superexec-hospital-b")
        accepted = fed.log("superexec-hospital-a")
    finally:
        fed.down()
    assert "only 1 healthy client(s) ['hospital-a']" in output, output[-3000:]
    assert "cannot take part: Flower error 2" in output, output[-3000:]  # the error reply of the refusal
    assert f"refused the task: app bundle sha256 {ours} is not pinned on this node (pinned: {other})" in refused
    assert "refused" not in accepted, accepted[-3000:]
    # nothing of the bundle was unpacked on hospital-b; hospital-a unpacked it in the gate's folder
    assert not list((fed.run_dir / "flwr-hospital-b").glob("**/apps/*"))
    assert [p.name[-8:] for p in (fed.run_dir / "flwr-hospital-a" / pinned.APPS_SUBDIR / "apps").iterdir()] == [
        ours[:8]
    ]
    left = subprocess.run(["pgrep", "-f", str(fed.root)], capture_output=True, text=True, check=False).stdout.split()
    assert not left, f"processes left behind: {left}"
