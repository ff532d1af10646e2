"""Run a Flower simulation of fededit from the project root, on a SuperLink of its own.

    python -m deploy.simulate                                  # the default job (make demo)
    python -m deploy.simulate --clients 2 --run-config "strategy='collabedit' num-slots=2"

``flwr run . --stream`` with the local connection (README, "Simulation") works too, but it shares
one detached SuperLink on fixed ports (39091/39093) that outlives the run and keeps the environment
of whoever started it. This runner instead starts a simulation SuperLink on free loopback ports
with this process's environment, turns off Flower's per-run dependency installation, runs
``flwr run . <connection> --stream`` against it with a ``$FLWR_HOME`` of its own, checks that the
run wrote its report, and stops the SuperLink by PID, also when the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flwr.common.config import parse_config_args

from deploy.loopback import free_port, interpreter_tools_first

ROOT = Path(__file__).resolve().parents[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def stop(pid: int, grace_s: float = 10.0) -> None:
    """Stop ``pid`` and everything it started: the SuperLink's SuperExec, the simulation process
    and its Ray processes, which run in process groups of their own. SIGTERM to every process group
    of the tree, then SIGKILL after ``grace_s``."""
    tree = process_tree(pid)
    groups = set()
    for p in tree:
        try:
            groups.add(os.getpgid(p))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgid(0))  # never our own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in tree):
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def start_superlink(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """A simulation SuperLink on a free loopback port (Flower 1.41 serves its Runtime, Control and
    Fleet APIs on that one port); returns (process, address)."""
    port = free_port()
    log = home / "superlink.log"
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(home / "state.db"),
        "--disable-runtime-dependency-installation",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited at start (code {process.returncode}); see {log}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"127.0.0.1:{port}"
        time.sleep(0.3)
    stop(process.pid)
    raise RuntimeError(f"the SuperLink did not open its port within 30 s; see {log}")


def _toml_value(value) -> str:
    """A run-config value as ``flwr run --run-config`` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def simulate(
    run_config: str = "",
    clients: int = 4,
    cpus_per_client: int | None = None,
    timeout_s: float | None = None,
    env: dict | None = None,
) -> tuple[int, Path]:
    """Run one simulation; returns (exit code, the run's output folder)."""
    pairs = parse_config_args([run_config]) if run_config.strip() else {}  # Flower's own parser
    run_name = str(pairs.get("run-name", "")) or time.strftime("sim-%Y%m%d-%H%M%S")
    out_dir = Path(str(pairs.get("output-dir", "")) or ROOT / "runs")
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    pairs.update({"run-name": run_name, "output-dir": str(out_dir)})
    run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in pairs.items())
    home = out_dir / run_name / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    environment = {
        **interpreter_tools_first(dict(os.environ)),
        **(env or {}),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    cpus = cpus_per_client or len(os.sched_getaffinity(0))  # default: one Ray actor, one model copy
    previous = signal.signal(signal.SIGTERM, _terminate)  # a killed runner still stops its SuperLink
    superlink, address = start_superlink(home, environment)
    try:
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "{address}"\ninsecure = true\n'
        )
        command = [
            "flwr",
            "run",
            ".",
            "sim",
            "--stream",
            "--federation-config",
            f"num-supernodes={clients} client-resources-num-cpus={cpus}",
            "--run-config",
            run_config,
        ]
        print("$ " + " ".join(command), flush=True)
        try:
            code = subprocess.run(command, cwd=ROOT, env=environment, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 124
    finally:
        stop(superlink.pid)
        signal.signal(signal.SIGTERM, previous)
    report = out_dir / run_name / "report.json"
    if code == 0 and not report.is_file():
        print(f"the run ended without writing {report}; see {home / 'superlink.log'}", file=sys.stderr)
        code = 1
    return code, out_dir / run_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run-config", default="", help="overrides of [tool.flwr.app.config], e.g. \"strategy='editavg'\""
    )
    parser.add_argument("--clients", type=int, default=4, help="number of simulated clients (SuperNodes)")
    parser.add_argument("--cpus-per-client", type=int, help="Ray resources per client (default: all cores, one actor)")
    args = parser.parse_args(argv)
    code, folder = simulate(args.run_config, args.clients, args.cpus_per_client)
    if code == 0:
        report = json.loads((folder / "report.json").read_text())
        print(f"\nreport: {folder / 'report.json'} and {folder / 'report.md'} (retention {report['retention']})")
    return code


if __name__ == "__main__":
    sys.exit(main())
