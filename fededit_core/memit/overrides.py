"""User settings -> MEMIT hyperparameter overrides, one parser for every caller: the ``fededit``
command line, the Flower run config and the benchmarks.

Settings are named as on the command line and in the run config (``mom2-weight``; ``mom2_weight``
is read too). An unset value keeps the model's default: None or ``""``, and 0 where the caller says
so (the run config, which has no None, writes 0 for unset). ``layers`` is a list of integers or a
text of them separated by commas or spaces (``"4,5,6"``, ``"4 5 6"``).
"""

from __future__ import annotations

from collections.abc import Mapping


def parse_layers(value) -> tuple[int, ...]:
    """``"4,5,6"``, ``"4 5 6"`` or ``[4, 5, 6]`` -> ``(4, 5, 6)``."""
    if isinstance(value, str):
        items = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"layers takes comma-separated integers, got {value!r}")
    try:
        if any(isinstance(x, (bool, float)) for x in items):
            raise ValueError
        return tuple(int(x) for x in items)
    except ValueError:
        raise ValueError(f"layers takes comma-separated integers, got {value!r}") from None


# setting -> (MEMITHyperParams field, parser)
MEMIT_SETTINGS = {
    "layers": ("layers", parse_layers),
    "mom2-weight": ("mom2_weight", float),
    "v-steps": ("v_steps", int),
    "batch-size": ("batch_size", int),
    "cov-source": ("cov_source", str),
    "cov-samples": ("cov_samples", int),
    "autocast": ("autocast", str),
    "editor": ("editor", str),
    "nullspace-threshold": ("nullspace_threshold", float),
    "alphaedit-l2": ("alphaedit_l2", float),
}


def memit_overrides(settings: Mapping, zero_is_unset: bool = False) -> dict:
    """The MEMIT overrides that ``settings`` set (module docstring); other keys are ignored."""
    out: dict = {}
    for key, (field, parse) in MEMIT_SETTINGS.items():
        value = settings.get(key, settings.get(field))
        if value is None or value == "" or (zero_is_unset and value == 0):
            continue
        out[field] = parse(value)
    return out
