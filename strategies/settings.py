"""The run's settings: every key of the Flower run config with its one default.

``[tool.flwr.app.config]`` in ``pyproject.toml`` lists the same keys and values (Flower refuses a key
it does not declare; a test checks that both agree). The ServerApp, the ClientApp, the benchmarks
and the tests all read their settings through :class:`RunSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fededit_core.data.errors import validation_message
from fededit_core.data.loaders import DEFAULT_ZSRE_TARGET, ZSRE_TARGETS
from fededit_core.fedleke.probe import DEFAULT_PROBE_TAU, MAX_PROBE_TAU
from fededit_core.fedleke.reedit import (
    DEFAULT_ALPHA,
    DEFAULT_GATE,
    DEFAULT_ROLLBACK_MARGIN,
    DEFAULT_VECTOR,
    GATES,
    VECTORS,
)
from fededit_core.memit.dynamic_covariance import DEFAULT_BETA0, DEFAULT_BETA1, MAX_BETA
from fededit_core.memit.hparams import DEFAULT_EDITOR, EDITORS
from fededit_core.memit.overrides import memit_overrides
from fededit_core.memit.update import DEFAULT_STATISTICS_FORM, STATISTICS_FORMS
from fededit_core.model.loading import DEFAULT_MODEL
from fededit_core.paths import safe_name
from strategies.collabedit import CONFLICT_POLICIES, DEFAULT_CONFLICT_POLICY, DEFAULT_DEDUP
from strategies.session import FederationError

MAX_MESSAGE_MB = 256  # the largest message a party reads (README, "Limits": the formula for other models)
STRATEGIES = ("fededit", "fededit-noreedit", "editavg", "editavg-factors", "collabedit", "sa", "ta", "ties", "local")


def _beta(default: float, alias: str, what: str):
    """A weight of CollabEdit's dynamic covariance (``memit.dynamic_covariance``)."""
    return Field(default, alias=alias, ge=0, le=MAX_BETA, description=f"collabedit: dynamic covariance, {what}")


class RunSettings(BaseModel):
    """One federated run. Fields take their run-config names (``num-slots``) or Python names."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)

    run: str = Field("", description="the run's name: run-name, else run-<Flower run id>")
    strategy: str = Field("fededit", description=" | ".join(STRATEGIES))
    model: str = Field(DEFAULT_MODEL, description="embedded name, saved folder, .gguf path or hub id")
    device: str = Field("cpu", description="simulation clients and the centralised run (deployment: node config)")
    dtype: str = Field("fp32", description="fp32 | bf16 | fp16")
    data: str = Field("builtin", description="builtin, or a CounterFact / zsRE / JSONL request file")
    partition: str = Field("field", description="field | iid | contiguous | relation | cluster")
    zsre_target: Literal[ZSRE_TARGETS] = Field(  # type: ignore[valid-type]
        DEFAULT_ZSRE_TARGET, alias="zsre-target", description="zsRE files: answers (MEMIT, FedLEKE) | alt (EasyEdit)"
    )
    max_requests: int = Field(0, alias="max-requests", ge=0, description="per client, 0 = all")
    seed: int = 0
    num_slots: int = Field(3, alias="num-slots", description="time slots")
    alpha: float = Field(DEFAULT_ALPHA, description="FedEdit Eq. 8 threshold")
    gate: str = Field(DEFAULT_GATE, description="FedEdit's re-edit condition: " + " | ".join(GATES))
    vector: str = Field(DEFAULT_VECTOR, alias="reedit-vector", description="what Eq. 8 compares: delta or z")
    probe_tau: float = Field(
        DEFAULT_PROBE_TAU, alias="probe-tau", ge=0, le=MAX_PROBE_TAU, description="gate probe: KL threshold, nats"
    )
    reuse: bool = Field(True, description="reuse stored z for repeated requests (keyed tags)")
    seal_mkvs: bool = Field(
        True, alias="seal-mkvs", description="fededit: MKVs sealed for the members (the server sees ciphertext)"
    )
    rollback_margin: float = Field(
        DEFAULT_ROLLBACK_MARGIN,
        alias="rollback-margin",
        description="simulated clients: roll back re-edits raising any own edit's target NLL by more nats; < 0: never "
        "(deployment: each node's own node config)",
    )
    min_clients: int = Field(2, alias="min-clients", ge=1, description="the run stops with fewer")
    wait_clients_s: float = Field(60.0, alias="wait-clients-s", ge=0)
    step_timeout_s: float = Field(
        3600.0, alias="step-timeout-s", ge=0, description="a client that takes longer for one step leaves; 0: no limit"
    )
    max_message_mb: int = Field(
        MAX_MESSAGE_MB, alias="max-message-mb", ge=1, le=1 << 20, description="largest message read from another party"
    )
    max_slot_mb: int = Field(
        1024, alias="max-slot-mb", ge=1, le=1 << 20, description="most bytes the server takes from one client per slot"
    )
    centralised: bool = Field(True, description="also run centralised MEMIT on the union (needs the data file)")
    secure_aggregation: bool = Field(False, alias="secure-aggregation", description="collabedit: sums through SecAgg+")
    collab_beta0: float = _beta(DEFAULT_BETA0, "collab-beta0", "C0's weight")
    collab_beta1: float = _beta(DEFAULT_BETA1, "collab-beta1", "the weight of earlier slots' K K^T (0: plain MEMIT)")
    collab_dedup: bool = Field(
        DEFAULT_DEDUP,
        alias="collab-dedup",
        description="collabedit: a request several clients send in one slot counts once",
    )
    collab_conflict: Literal[CONFLICT_POLICIES] = Field(  # type: ignore[valid-type]
        DEFAULT_CONFLICT_POLICY,
        alias="collab-conflict",
        description="collabedit: one fact edited to different objects: last-writer | reject | keep-both",
    )
    collab_transport: Literal[STATISTICS_FORMS] = Field(  # type: ignore[valid-type]
        DEFAULT_STATISTICS_FORM,
        alias="collab-transport",
        description="collabedit: lowrank (thin factors, n (d + d_ff) numbers) | dense (R K^T and K K^T)",
    )
    fluency: bool = False
    run_name: str = Field("", alias="run-name", description='"" = run-<flower run id>; name a run to resume it')
    output_dir: str = Field("runs", alias="output-dir")
    capture_dir: str = Field("", alias="capture-dir", description="tests: write every message payload here")
    layers: str = Field("", description='MEMIT overrides; "" / 0 keep the model\'s defaults')
    mom2_weight: float = Field(0.0, alias="mom2-weight")
    v_steps: int = Field(0, alias="v-steps")
    cov_samples: int = Field(0, alias="cov-samples")
    cov_source: str = Field("", alias="cov-source", description='"" = self (sampled from the model), a file, hf:NAME')
    editor: Literal[EDITORS] = Field(DEFAULT_EDITOR, description="memit | alphaedit | pmet")  # type: ignore[valid-type]
    nullspace_threshold: float = Field(0.0, alias="nullspace-threshold", description="alphaedit; 0 = its default")
    alphaedit_l2: float = Field(0.0, alias="alphaedit-l2", description="alphaedit; 0 = its default")
    # set by the caller, not in the run config
    baseline: bool = Field(True, exclude=True, description="clients also evaluate the unedited model")
    others_limit: int = Field(0, exclude=True, description="absorbed requests evaluated per client (0: all)")
    per_request: bool = Field(False, exclude=True, description="clients also report absorbed requests one by one")
    store_path: Path | None = Field(None, exclude=True, description="default: <output-dir>/<run>/mkv_store.sqlite")

    @model_validator(mode="after")
    def _coherent(self):
        for what, name in (("run", self.run), ("run-name", self.run_name.strip())):
            if name:
                try:
                    safe_name(name, what)
                except ValueError as err:
                    raise FederationError(str(err)) from None
        if self.strategy not in STRATEGIES:
            raise FederationError(f"unknown strategy {self.strategy!r}; expected one of {list(STRATEGIES)}")
        if self.num_slots < 1:
            raise FederationError(f"num-slots must be >= 1, got {self.num_slots}")
        if not 0.0 <= self.alpha <= 1.0:
            raise FederationError(f"alpha is a cosine threshold in [0, 1], got {self.alpha}")
        if self.gate not in GATES:
            raise FederationError(f"gate must be one of {list(GATES)}, got {self.gate!r}")
        if self.vector not in VECTORS:
            raise FederationError(f"reedit-vector must be one of {list(VECTORS)}, got {self.vector!r}")
        if self.secure_aggregation and self.strategy != "collabedit":
            raise FederationError(
                f"secure-aggregation is offered for collabedit only (its uploads are plain "
                f"sums), not for {self.strategy!r}"
            )
        if self.secure_aggregation and self.collab_transport != "dense":
            raise FederationError(
                "secure-aggregation masks fixed-size vectors and sums them, which thin factors are not: "
                "set collab-transport = 'dense' with it"
            )
        if self.editor != "memit" and self.strategy == "editavg-factors":
            raise FederationError("editavg-factors averages MEMIT's two factors: it needs editor = 'memit'")
        if self.editor != "memit" and (self.collab_beta0, self.collab_beta1) != (DEFAULT_BETA0, DEFAULT_BETA1):
            raise FederationError(
                "collab-beta0/collab-beta1 (CollabEdit's dynamic covariance) change MEMIT's prior; "
                f"editor = {self.editor!r} keeps its own memory of earlier keys: leave them at their defaults"
            )
        return self

    @classmethod
    def from_run_config(cls, config: Mapping, run_id: int | None = None, **extra) -> RunSettings:
        """From Flower's run config; the run is named ``run-name``, else ``run-<run_id>``."""
        try:
            settings = cls.model_validate({**dict(config), **extra})
        except ValidationError as err:
            raise FederationError(f"invalid run config: {validation_message(err, show_input=True)}") from None
        run = settings.run or settings.run_name.strip() or f"run-{run_id}"
        try:
            safe_name(run, "run-name")
        except ValueError as err:
            raise FederationError(str(err)) from None
        return settings.model_copy(update={"run": run})

    def run_config(self) -> dict:
        """The run-config keys and values (``pyproject.toml``'s names)."""
        return self.model_dump(by_alias=True, exclude={"run"})

    def memit_overrides(self) -> dict:
        return memit_overrides(self.run_config(), zero_is_unset=True)

    @property
    def out_dir(self) -> Path:
        """``<output-dir>/<run>`` (absolute): the report and the server's MKV store."""
        return Path(self.output_dir).resolve() / self.run

    @property
    def simulation_state_dir(self) -> Path:
        """Where simulated clients keep their checkpoints: ``<output-dir>/<run>/clients``."""
        return self.out_dir / "clients"

    @property
    def mkv_store(self) -> Path:
        return self.store_path or self.out_dir / "mkv_store.sqlite"

    @property
    def limits(self) -> dict:
        """Keyword arguments of ``wire.messages.Limits`` for this run."""
        return {"max_message_bytes": self.max_message_mb << 20}

    @property
    def timeout(self) -> float | None:
        return self.step_timeout_s or None
