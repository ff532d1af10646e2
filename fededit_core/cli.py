"""The ``fededit`` command: edit, eval, bench."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .report import KIND_COLUMNS


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a saved folder, a .gguf file or a hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def _add_hparam_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_layers, help="edited layers, e.g. 4,5,6,7,8")
    p.add_argument("--mom2-weight", type=float, help="lambda of MEMIT's update")
    p.add_argument("--v-steps", type=int, help="z optimisation steps")
    p.add_argument("--batch-size", type=int, help="requests optimised together")
    p.add_argument("--cov-source", help="'self', a text file, or hf:<dataset>")
    p.add_argument("--cov-samples", type=int)
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="autocast the z optimisation")
    p.add_argument("--templates", help="JSON file of context templates ({\"groups\": [[\"{}\"], [...]]}) "
                                       "instead of sampling them from the model")


def _hp_overrides(args) -> dict:
    return dict(layers=args.layers, mom2_weight=args.mom2_weight, v_steps=args.v_steps,
                batch_size=args.batch_size, cov_source=args.cov_source, cov_samples=args.cov_samples,
                autocast=args.autocast)


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
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            if loc:
                msg = f"{loc}: {msg} (got {e.get('input')!r})"
            parts.append(msg)
        text = f"invalid {err.title}: " + "; ".join(parts)
    else:
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def _generations(model, tok, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    from .metrics import generate_greedy

    full = generate_greedy(model, tok, prompts, max_new_tokens=max_new_tokens)
    return [text[len(prompt):].strip().replace("\n", " ") if text.startswith(prompt) else text
            for prompt, text in zip(prompts, full)]


def cmd_edit(args) -> int:
    from .datasets import dataset_kind, load_requests
    from .metrics import evaluate
    from .pipeline import make_editor
    from .report import format_table

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a folder")
    requests = load_requests(args.requests, n=args.n)
    kind = dataset_kind(args.requests)
    templates = None
    if getattr(args, "templates", None):
        from .templates import ContextTemplates

        templates = ContextTemplates.model_validate_json(Path(args.templates).read_text())
    editor = make_editor(args.model, args.device, args.dtype, templates=templates, **_hp_overrides(args))
    model, tok = editor.model, editor.tok
    print(f"editing {len(requests)} request(s) from {args.requests} into {args.model} "
          f"(layers {list(editor.hp.layers)}, lambda {editor.hp.mom2_weight:g})", file=sys.stderr)
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
    print(format_table([{"prompt": r.text, "target": r.target_new, "before": b, "after": a}
                        for r, b, a in zip(shown, before_text, after_text)]))
    print(f"\nMEMIT: {seconds:.1f} s ({result.seconds['covariance']:.1f} s C0, {result.seconds['z']:.1f} s z, "
          f"{result.seconds['layers']:.1f} s layer updates)")
    summary = {"requests": str(args.requests), "n": len(requests), "hparams": editor.hp.model_dump(),
               "templates": editor.templates.model_dump(mode="json"),
               "before": {k: v for k, v in before.items() if k != "per_request"},
               "after": {k: v for k, v in after.items() if k != "per_request"}, "seconds": result.seconds}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:  # written whole into a staging folder, then moved into place: never half a model in --out
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        (staging / "fededit_edit.json").write_text(json.dumps(_jsonable(summary), indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"saved the edited model to {out}")
    return 0


DEMO_EDITS = Path(__file__).parent / "data" / "demo_edits.jsonl"


def cmd_demo(args) -> int:
    """One model, no federation: MEMIT on the embedded model with the built-in edits (``make demo``
    runs the federated main job)."""
    args.requests, args.n = str(DEMO_EDITS), None
    return cmd_edit(args)


def cmd_eval(args) -> int:
    from .datasets import dataset_kind, load_requests
    from .metrics import evaluate
    from .models import load_model
    from .pipeline import configure_threads
    from .report import format_table

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
        Path(args.json).write_text(json.dumps(_jsonable({**summary, "kind": kind, "model": args.model,
                                                         "data": str(args.data)}), indent=2))
    return 0


def cmd_bench(args) -> int:
    if args.bench == "memit":
        from bench.memit_speed import run

        return run(args)
    raise SystemExit(f"unknown benchmark {args.bench!r}")


def cmd_worker(args) -> int:
    """A long-lived edit worker beside a SuperNode (deployment)."""
    from .worker import ClientSpec
    from .worker_service import run_forever

    logging.getLogger("fededit").setLevel(logging.INFO)
    preload = None
    if args.preload:
        preload = ClientSpec(run="preload", name="preload", model=args.preload, device=args.device,
                             dtype=args.dtype, requests="builtin", state_dir=".")
    run_forever(args.address, preload)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fededit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit a model with MEMIT and save it")
    _add_model_args(p)
    _add_hparam_args(p)
    p.add_argument("--requests", required=True, help="CounterFact, zsRE or plain JSONL edit requests")
    p.add_argument("--n", type=int, help="edit the first N requests")
    p.add_argument("--out", required=True, help="folder for the edited model")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("demo", help="edit the embedded model with the built-in counterfactual edits")
    _add_model_args(p)
    _add_hparam_args(p)
    p.add_argument("--out", default="runs/demo/edited-model", help="folder for the edited model")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate a model on CounterFact / zsRE records")
    _add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int)
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--fluency", action="store_true", help="also generate text and measure n-gram entropy")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("worker", help="serve an edit worker for a SuperNode's ClientApp (deployment)")
    p.add_argument("--address", required=True, help="unix:/path/worker.sock or 127.0.0.1:PORT")
    p.add_argument("--preload", help="load this model before serving (e.g. smollm2-135m)")
    p.add_argument("--device", default="cpu", help="device of the preloaded model (cpu, cuda, cuda:1, auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("bench", choices=["memit"])
    _add_model_args(p)
    _add_hparam_args(p)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--data", help="CounterFact file (default: ../shared/data/counterfact/counterfact-val.json)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-reference", action="store_true", help="skip the one-at-a-time z loop")
    p.add_argument("--no-cold", action="store_true", help="use the cached C0 instead of timing a cold build")
    p.add_argument("--compare-cov", help="text file for a second C0 (default: ../shared/data/wikitext/wiki.test.raw)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    from .datasets import DataError
    from .families import UnsupportedModelError
    from .models import ModelLoadError

    try:
        return args.func(args)
    except (DataError, UnsupportedModelError, ModelLoadError, ValidationError, OSError, ValueError) as err:
        print(f"fededit: error: {_error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
