"""Run only the app bundle this organisation pinned: ``fededit-superexec`` and ``fededit-clientapp``.

Flower 1.41 cannot verify a signature on a self-built bundle offline (deploy/README.md, "Which app a
SuperNode runs"), so a node pins the bundles it accepts by the sha256 of their bytes (the hash that
``flwr build`` and the SuperLink name a bundle by) and checks it outside the bundle:

- ``flower-supernode --isolation process`` starts no app processes itself;
- ``fededit-superexec --app-hash SHA256 [flower-superexec options]`` is Flower's SuperExec (it takes
  the SuperNode's tasks and starts one process per task) except that every process it starts, for
  any task type, is ``fededit-clientapp``, and it hands the pinned hashes down in ``FEDEDIT_APP_HASH``;
- ``fededit-clientapp`` is Flower's ``flwr-clientapp`` with a gate between pulling the task and
  unpacking its bundle: a bundle whose sha256 is not pinned, or whose stated hash or app id differs
  from its content, is refused before anything in it is written to disk or imported (Flower then
  sends the server an error reply). Bundles are unpacked under ``FLWR_HOME/fededit-pinned``, which
  only this gate writes to, so an app folder there always holds checked content.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path

ENV = "FEDEDIT_APP_HASH"  # the pinned hashes, comma-separated, from fededit-superexec to its processes
APPS_SUBDIR = "fededit-pinned"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UntrustedApp(RuntimeError):
    """The bundle of a task is not one this node accepts."""


def parse_hashes(text: str) -> frozenset[str]:
    """The sha256 hex digests in ``text`` (comma- or space-separated); at least one, each well formed."""
    hashes = frozenset(part.lower() for part in re.split(r"[,\s]+", text.strip()) if part)
    bad = sorted(h for h in hashes if not _SHA256.fullmatch(h))
    if bad or not hashes:
        raise ValueError(f"expected one or more sha256 hex digests (64 hex digits), got {text!r}")
    return hashes


def refusal(content: bytes, stated_hash: str, run, accepted: frozenset[str]) -> str | None:
    """Why the bundle ``content`` (stated hash ``stated_hash``, of Flower ``Run`` ``run``) may not
    run here, or None when it may."""
    digest = hashlib.sha256(content).hexdigest()
    if digest not in accepted:
        return f"app bundle sha256 {digest} is not pinned on this node (pinned: {', '.join(sorted(accepted))})"
    if stated_hash != digest or run.fab_hash != digest:
        return f"app bundle sha256 {digest} is stated as {stated_hash} / {run.fab_hash} (run {run.run_id})"
    from flwr.common.config import get_fab_config, get_metadata_from_config

    app_id, version = get_metadata_from_config(get_fab_config(content))
    if (run.fab_id, run.fab_version) != (app_id, version):
        return f"run {run.run_id} names app {run.fab_id} {run.fab_version}, its bundle is {app_id} {version}"
    return None


class Gate:
    """Wraps Flower's task pull and bundle install in one ClientApp process: the install goes ahead
    only for the bytes of a bundle that the pull found acceptable."""

    def __init__(self, accepted: frozenset[str], pull, install):
        self.accepted, self._pull, self._install = accepted, pull, install
        self._checked: str | None = None  # sha256 of the accepted bundle
        self._reason = "no task pulled"

    def pull(self, client):
        message, context, run, fab = self._pull(client)
        self._reason = refusal(fab.content, fab.hash_str, run, self.accepted)
        self._checked = None if self._reason else fab.hash_str
        return message, context, run, fab

    def install(self, fab_file, *args, **kwargs):
        if not isinstance(fab_file, bytes) or hashlib.sha256(fab_file).hexdigest() != self._checked:
            reason = self._reason or "the bundle to install is not the one checked"
            from flwr.supercore import log

            log(logging.ERROR, "fededit-clientapp refused the task: %s", reason)
            raise UntrustedApp(reason)
        return self._install(fab_file, *args, **kwargs)


def install_gate(accepted: frozenset[str]) -> Gate:
    """Put a Gate around Flower's pull and install in its ClientApp runner (module globals that
    ``run_clientapp`` looks up when it runs); fail when Flower no longer has them."""
    import flwr.supernode.runtime.run_clientapp as runner

    for name in ("pull_task_input", "install_from_fab"):
        if not callable(getattr(runner, name, None)):
            raise RuntimeError(f"flwr.supernode.runtime.run_clientapp.{name} is gone: this Flower is not 1.41")
    gate = Gate(accepted, runner.pull_task_input, runner.install_from_fab)
    runner.pull_task_input, runner.install_from_fab = gate.pull, gate.install
    return gate


def clientapp_main() -> None:
    """``fededit-clientapp``: ``flwr-clientapp`` (same options) that runs pinned bundles only."""
    try:
        accepted = parse_hashes(os.environ.get(ENV, ""))
    except ValueError as err:
        sys.exit(f"fededit-clientapp: {ENV}: {err} (start it through fededit-superexec --app-hash)")
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    os.environ["FLWR_HOME"] = str(home / APPS_SUBDIR)  # apps here passed the gate
    install_gate(accepted)
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def clientapp_command() -> str:
    """The ``fededit-clientapp`` script of this environment (beside its Python, else on PATH)."""
    beside = Path(sys.executable).parent / "fededit-clientapp"
    found = str(beside) if beside.exists() else shutil.which("fededit-clientapp")
    if not found:
        sys.exit("fededit-superexec: fededit-clientapp not found (pip install -e . in this environment)")
    return found


def superexec_main(argv: list[str] | None = None) -> None:
    """``fededit-superexec --app-hash SHA256 [...] FLOWER_SUPEREXEC_OPTIONS``."""
    parser = argparse.ArgumentParser(
        prog="fededit-superexec",
        add_help=False,
        description="flower-superexec whose task processes are all fededit-clientapp, which runs only "
        "the app bundles pinned here. Other options go to flower-superexec (--help shows them).",
    )
    parser.add_argument("--app-hash", action="append", default=[], help="sha256 of an accepted .fab (repeat)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    elif not args.app_hash:
        parser.error("--app-hash is required (deploy/app_hash.sh prints the hash of this checkout's bundle)")
    if any(a.startswith("--executor") for a in rest):
        parser.error("only Flower's default subprocess executor starts fededit-clientapp")
    if args.app_hash:
        try:
            os.environ[ENV] = ",".join(sorted(parse_hashes(",".join(args.app_hash))))
        except ValueError as err:
            parser.error(f"--app-hash: {err}")
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    command = clientapp_command()
    for task_type in TASK_TYPE_TO_COMMAND:  # the executor looks the command up here per launch
        TASK_TYPE_TO_COMMAND[task_type] = command
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["fededit-superexec", *rest]
    flower_superexec()
