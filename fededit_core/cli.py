"""The ``fededit`` command: edit, eval, demo, secret, bench.

The edit worker of a deployment is ``fededit-worker`` (``client_app.worker_service``) and the speed
benchmark ``python -m bench.memit_speed``; both take the model and MEMIT options defined here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from fededit_core.data.errors import validation_message
from fededit_core.eval.tables import KIND_COLUMNS
from fededit_core.io import atomic_folder
from fededit_core.memit.hparams import DEFAULT_EDITOR, EDITORS
from fededit_core.memit.overrides import memit_overrides, parse_layers
from fededit_core.model.loading import DEFAULT_MODEL


def _layers(text: str) -> tuple[int, ...]:
    try:
        return parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--{err}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, a saved folder, a .gguf file or a hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def add_hparam_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_layers, help="edited layers, e.g. 4,5,6,7,8")
    p.add_argument("--mom2-weight", type=float, help="lambda of MEMIT's update")
    p.add_argument("--v-steps", type=int, help="z optimisation steps")
    p.add_argument("--batch-size", type=int, help="requests optimised together")
    p.add_argument("--cov-source", help="'self', a text file, or hf:<dataset>")
    p.add_argument("--cov-samples", type=int)
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="autocast the z optimisation")
    p.add_argument("--editor", choices=EDITORS, help=f"the layer update (default {DEFAULT_EDITOR})")
    p.add_argument("--nullspace-threshold", type=float, help="alphaedit: C0's eigenvalues below it span the null space")
    p.add_argument("--alphaedit-l2", type=float, help="alphaedit: L2 of its update")


def _add_templates_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--templates",
        help='JSON file of context templates ({"groups": [["{}"], [...]]}) instead of sampling them from the model',
    )


def _jsonable(value):
    """``value`` with NaN/inf floats (an undefined rate, e.g. PS without paraphrases) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _error_line(err: BaseException) -> str:
    """One line for the terminal: pydantic's and transformers' messages span several lines."""
    if isinstance(err, ValidationError):
        text = f"invalid {err.title}: " + validation_message(err, show_input=True)
    else:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _generations(model, tok, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    from fededit_core.eval.metrics import generate_greedy

    full = generate_greedy(model, tok, prompts, max_new_tokens=max_new_tokens)
    return [
        text[len(prompt) :].strip().replace("\n", " ") if text.startswith(prompt) else text
        for prompt, text in zip(prompts, full)
    ]


def cmd_edit(args) -> int:
    from fededit_core.data.loaders import dataset_kind, load_requests
    from fededit_core.eval.metrics import evaluate
    from fededit_core.eval.tables import format_table
    from fededit_core.memit.editor import make_editor

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a folder")
    requests = load_requests(args.requests, n=args.n)
    kind = dataset_kind(args.requests)
    templates = None
    if getattr(args, "templates", None):
        from fededit_core.memit.templates import ContextTemplates

        templates = ContextTemplates.model_validate_json(Path(args.templates).read_text())
    editor = make_editor(args.model, args.device, args.dtype, templates=templates, **memit_overrides(vars(args)))
    model, tok = editor.model, editor.tok
    print(
        f"editing {len(requests)} request(s) from {args.requests} into {args.model} "
        f"(layers {list(editor.hp.layers)}, lambda {editor.hp.mom2_weight:g})",
        file=sys.stderr,
    )
    shown = requests[: min(3, len(requests))]
    before_text = _generations(model, tok, [r.text for r in shown])
    before = evaluate(model, tok, requests, kind)
    started = time.perf_counter()
    result = editor.edit(requests)
    seconds = time.perf_counter() - started
    after = evaluate(model, tok, requests, kind)
    after_text = _generations(model, tok, [r.text for r in shown])

    columns = KIND_COLUMNS[kind]
    print(format_table([{"model": "unedited", **before}, {"model": "edited", **after}], ["model", *columns]))
    print()
    print(
        format_table(
            [
                {"prompt": r.text, "target": r.target_new, "before": b, "after": a}
                for r, b, a in zip(shown, before_text, after_text)
            ]
        )
    )
    print(
        f"\nMEMIT: {seconds:.1f} s ({result.seconds['covariance']:.1f} s C0, {result.seconds['z']:.1f} s z, "
        f"{result.seconds['layers']:.1f} s layer updates)"
    )
    summary = {
        "requests": str(args.requests),
        "n": len(requests),
        "hparams": editor.hp.model_dump(),
        "templates": editor.templates.model_dump(mode="json"),
        "before": {k: v for k, v in before.items() if k != "per_request"},
        "after": {k: v for k, v in after.items() if k != "per_request"},
        "seconds": result.seconds,
    }
    with atomic_folder(out) as staging:  # never half a model in --out
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "fededit_edit.json").write_text(json.dumps(_jsonable(summary), indent=2))
    print(f"saved the edited model to {out}")
    return 0


def cmd_demo(args) -> int:
    """One model, no federation: MEMIT on the embedded model with the built-in edits (``make demo``
    runs the federated main job)."""
    from fededit_core.data.builtin import DEMO_EDITS

    args.requests, args.n = str(DEMO_EDITS), None
    return cmd_edit(args)


def cmd_eval(args) -> int:
    from fededit_core.data.loaders import dataset_kind, load_requests
    from fededit_core.eval.metrics import evaluate
    from fededit_core.eval.tables import format_table
    from fededit_core.model.loading import configure_threads, load_model

    configure_threads()
    requests = load_requests(args.data, n=args.n)
    kind = dataset_kind(args.data)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    metrics = evaluate(model, tok, requests, kind, fluency=args.fluency)
    summary = {k: v for k, v in metrics.items() if k != "per_request"}
    columns = KIND_COLUMNS[kind] + (["fluency"] if args.fluency else [])
    print(format_table([{"model": args.model, **summary}], ["model", *columns]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(_jsonable({**summary, "kind": kind, "model": args.model, "data": str(args.data)}), indent=2)
        )
    return 0


def cmd_secret(args) -> int:
    """The federation secret (deploy/README.md, section 5): ``new`` refuses to overwrite a file."""
    import os
    import secrets

    from fededit_core.fedleke.sealing import key_id

    path = Path(args.file).expanduser()
    if args.action == "new":
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # FileExistsError: an OSError
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    secret = path.read_bytes()
    if len(secret) < 16:
        raise ValueError(f"{path} holds {len(secret)} bytes; a federation secret has at least 16")
    print(key_id(secret))
    return 0


BENCHMARKS = ("privacy", "faults", "fuzz", "reproduce", "memit_speed", "mkv_fidelity", "gate_analysis")


def cmd_bench(args) -> int:
    """A benchmark is a runnable recipe beside the library, started as its own process: the
    engine never imports ``bench``."""
    import subprocess

    return subprocess.call([sys.executable, "-m", f"bench.{args.name}", *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fededit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit a model with MEMIT and save it")
    add_model_args(p)
    add_hparam_args(p)
    _add_templates_arg(p)
    p.add_argument("--requests", required=True, help="CounterFact, zsRE or plain JSONL edit requests")
    p.add_argument("--n", type=int, help="edit the first N requests")
    p.add_argument("--out", required=True, help="folder for the edited model")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="edit the embedded model with the built-in counterfactual edits")
    add_model_args(p)
    add_hparam_args(p)
    _add_templates_arg(p)
    p.add_argument("--out", default="runs/demo/edited-model", help="folder for the edited model")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate a model on CounterFact / zsRE records")
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int)
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--fluency", action="store_true", help="also generate text and measure n-gram entropy")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("secret", help="make a federation secret, or print a secret file's public key id")
    p.add_argument("action", choices=["new", "id"], help="new: write 32 random bytes (mode 600); id: print the key id")
    p.add_argument("file")
    p.set_defaults(func=cmd_secret)

    p = sub.add_parser("bench", help="run one of the project's benchmarks (python -m bench.NAME)")
    p.add_argument("name", choices=BENCHMARKS, help=" | ".join(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (NAME --help)")
    p.set_defaults(func=cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from fededit_core.data.loaders import DataError
    from fededit_core.model.families import UnsupportedModelError
    from fededit_core.model.loading import ModelLoadError

    try:
        return args.func(args)
    except (DataError, UnsupportedModelError, ModelLoadError, ValidationError, OSError, ValueError) as err:
        print(f"fededit: error: {_error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
