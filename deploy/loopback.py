"""A whole deployment on one machine, through the deploy/ scripts: a rehearsal and the deployment test.

``Loopback(root, model, {"hospital-a": requests_a, ...}).up()`` makes a CA and the SuperLink's
certificate (make_certs.sh), one key pair per organisation (make_node_key.sh) and the federation
secret, starts the SuperLink with TLS and SuperNode authentication (start_superlink.sh), registers
the keys (register_node.sh, which also writes the CLI connection into ``root/flwr/config.toml``) and
starts each organisation's edit worker and SuperNode (start_node.sh, concurrently). ``run(...)`` is
``flwr run . <connection> --stream`` from the project root; ``down()`` stops everything by the PID
files (stop.sh). Every port is a free one; every process gets ``FEDEDIT_CACHE=cache`` (default
``root/cache``).

From a shell (from the project root, the virtual environment active)::

    python -m deploy.loopback up --root /tmp/fed --model smollm2-135m \\
        --requests hospital-a=a.jsonl --requests hospital-b=b.jsonl
    FLWR_HOME=/tmp/fed/flwr flwr run . fededit --stream --run-config "centralised=false ..."
    python -m deploy.loopback down --root /tmp/fed

``python -m deploy.loopback demo --root /tmp/fed`` (= ``make demo-deploy``) does all three for the
default job: the built-in edits as four organisations' private files (``client-0`` ... ``client-3``),
the job itself with the centralised comparison (the built-in set ships with the package, so the
server can run it), the table printed and the report under ``root/runs/loopback-demo``, then down.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from fededit_core.model.loading import DEFAULT_MODEL

DEPLOY = Path(__file__).resolve().parent
PROJECT = DEPLOY.parent
CONNECTION = "fededit"


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux; 49152, the IANA start, elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


_HANDED_OUT: set[int] = set()  # ports this process has given out: their servers may not listen yet


def free_port() -> int:
    """A TCP port nothing listens on now, below the ephemeral range, and never one this process gave
    out before: a federation's ports are all drawn before its first server binds, so a second draw of
    the same free port would give two servers one port. (A port the OS hands out, bind to 0, can be
    taken as the source port of an outgoing connection before its server binds it.)"""
    start = _ephemeral_start()
    pick = random.SystemRandom()
    for _ in range(200):
        port = pick.randrange(max(1024, start - 12000), start)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded host: let the OS pick
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


def interpreter_tools_first(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's scripts folder (flwr, flower-superlink, fededit) first on PATH,
    so that the tools of this environment run even when it is not activated (``make test``)."""
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Loopback:
    def __init__(
        self,
        root: Path | str,
        model: str,
        requests: dict[str, Path | str],
        device: str = "cpu",
        dtype: str = "fp32",
        cache: Path | str | None = None,
        app_hashes: dict[str, str] | None = None,
    ):
        self.root = Path(root).resolve()
        self.cache = Path(cache).resolve() if cache else self.root / "cache"
        self.model, self.device, self.dtype = model, device, dtype
        self.requests = {name: Path(path).resolve() for name, path in requests.items()}
        self.app_hashes = dict(app_hashes or {})  # organisation -> the bundle sha256 its node pins (--app-hash)
        self.certs, self.keys, self.run_dir = self.root / "certs", self.root / "keys", self.root / "run"
        self.flwr_home, self.state = self.root / "flwr", self.root / "state"
        self.secret = self.root / "federation.secret"
        state_file = self.root / "loopback.json"  # ports of a federation that is up (for `down`)
        saved = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.port = saved.get("port") or free_port()
        self.node_ports = saved.get("node_ports") or {name: free_port() for name in self.requests}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every command: this interpreter's scripts first on PATH, the CLI's
        FLWR_HOME, fededit's cache, no dependency installation, telemetry or update checks."""
        env = interpreter_tools_first(dict(os.environ))
        env.update(
            FLWR_HOME=str(self.flwr_home),
            FEDEDIT_CACHE=str(self.cache),
            FEDEDIT_DEPLOY_LOCAL=str(self.root),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def script(self, name: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        """Run deploy/<name> and fail with its output when it fails."""
        proc = subprocess.run(
            ["bash", str(DEPLOY / name), *map(str, args)],
            cwd=PROJECT,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"deploy/{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, worker_timeout: float = 300) -> Loopback:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "loopback.json").write_text(json.dumps({"port": self.port, "node_ports": self.node_ports}))
        self.script("make_certs.sh", self.certs)
        for name in self.requests:
            self.script("make_node_key.sh", self.keys, name)
        self.secret.write_bytes(secrets.token_bytes(32))
        self.secret.chmod(0o600)
        self.script(
            "start_superlink.sh",
            "--certs",
            self.certs,
            "--dir",
            self.run_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        )
        for name in self.requests:
            self.script(
                "register_node.sh",
                self.keys / f"{name}.pub",
                CONNECTION,
                SUPERLINK_ADDRESS=self.address,
                CA_CERT=str(self.certs / "ca.crt"),
            )
        nodes = {
            name: subprocess.Popen(
                [
                    "bash",
                    str(DEPLOY / "start_node.sh"),
                    "--name",
                    name,
                    "--requests",
                    str(path),
                    "--superlink",
                    self.address,
                    "--key",
                    str(self.keys / name),
                    "--ca",
                    str(self.certs / "ca.crt"),
                    "--model",
                    self.model,
                    "--device",
                    self.device,
                    "--dtype",
                    self.dtype,
                    "--secret-file",
                    str(self.secret),
                    "--state-dir",
                    str(self.state / name),
                    "--dir",
                    str(self.run_dir),
                    "--port",
                    str(self.node_ports[name]),
                    *(["--app-hash", self.app_hashes[name]] if name in self.app_hashes else []),
                ],
                cwd=PROJECT,
                env=self.env(WORKER_START_TIMEOUT=str(worker_timeout)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name, path in self.requests.items()
        }
        failed = []
        for name, proc in nodes.items():
            out, _ = proc.communicate(timeout=worker_timeout + 60)
            if proc.returncode != 0:
                failed.append(f"{name}:\n{out}")
        if failed:
            raise RuntimeError("deploy/start_node.sh failed for " + "\n".join(failed))
        return self

    def run(self, run_config: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run . fededit --stream --run-config RUN_CONFIG`` from the project root."""
        return subprocess.run(
            ["flwr", "run", ".", CONNECTION, "--stream", "--run-config", run_config],
            cwd=PROJECT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log(self, name: str) -> str:
        """The text of run/<name>.log (superlink, worker-NAME, supernode-NAME)."""
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def down(self) -> None:
        if self.run_dir.exists():
            self.script("stop.sh", self.run_dir, timeout=180)
        (self.root / "loopback.json").unlink(missing_ok=True)

    def __enter__(self) -> Loopback:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()


def builtin_requests(folder: Path) -> dict[str, Path]:
    """The default job's built-in edits as one private request file per client (by ``client`` field)."""
    from fededit_core.data.builtin import BUILTIN_FEDERATION

    folder.mkdir(parents=True, exist_ok=True)
    by_client: dict[str, list[str]] = {}
    for line in BUILTIN_FEDERATION.read_text().splitlines():
        if line.strip():
            by_client.setdefault(json.loads(line)["client"], []).append(line)
    files = {}
    for name, lines in sorted(by_client.items()):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    return files


def demo(root: Path, model: str, device: str, extra: str = "") -> int:
    """The default job between real processes: up, ``flwr run``, down (whatever happens)."""
    from fededit_core.paths import cache_dir

    # the user's cache: the dequantised model and C0 are made once, not once per demo folder
    fed = Loopback(root, model, builtin_requests(Path(root).resolve() / "requests"), device=device, cache=cache_dir())
    try:
        fed.up()
        run_config = (
            f"model='{model}' device='{device}' data='builtin' partition='field' centralised=true "
            f"min-clients={len(fed.requests)} run-name='loopback-demo' output-dir='{fed.root / 'runs'}' "
            f"{extra}"
        ).strip()
        proc = subprocess.Popen(
            ["flwr", "run", ".", CONNECTION, "--stream", "--run-config", run_config], cwd=PROJECT, env=fed.env()
        )
        code = proc.wait()
    finally:
        fed.down()
    print(f"report: {fed.root / 'runs' / 'loopback-demo' / 'report.json'}; logs: {fed.run_dir}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start a loopback federation under --root")
    p.add_argument("--root", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--requests",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="one organisation and its private request file (repeat)",
    )
    p = sub.add_parser("down", help="stop the loopback federation under --root")
    p.add_argument("--root", required=True)
    p = sub.add_parser("demo", help="the default job between real processes: up, flwr run, down")
    p.add_argument("--root", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--run-config", default="", help="more run-config pairs, e.g. \"strategy='collabedit'\"")
    args = parser.parse_args(argv)
    if args.command == "down":
        Loopback(args.root, "", {}).down()
        return 0
    if args.command == "demo":
        return demo(Path(args.root), args.model, args.device, args.run_config)
    requests = dict(item.split("=", 1) for item in args.requests)
    fed = Loopback(args.root, args.model, requests, device=args.device, cache=os.environ.get("FEDEDIT_CACHE"))
    try:
        fed.up()
    except BaseException:
        fed.down()
        raise
    print(
        f"SuperLink {fed.address}; nodes {', '.join(requests)}; logs in {fed.run_dir}\n"
        f"run:  FLWR_HOME={fed.flwr_home} flwr run . {CONNECTION} --stream "
        f"--run-config \"model='{fed.model}' centralised=false ...\"\n"
        f"stop: python -m deploy.loopback down --root {fed.root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
