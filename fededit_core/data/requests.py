"""Edit requests: one fact to insert, plus the prompts that evaluate it.

A request asks that ``prompt.format(subject)`` be continued by ``target_new``
instead of ``target_true``. The evaluation prompts follow CounterFact
(paraphrases must change, neighbourhood prompts must not) and zsRE.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EditRequest(BaseModel):
    """One counterfactual fact: (subject, relation prompt) -> target_new."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str
    subject: str
    prompt: str = Field(description='relation template with "{}" where the subject goes')
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = Field(
        default=None, description="true answer of the neighbourhood prompts (default: target_true)"
    )
    generation_prompts: tuple[str, ...] = ()
    timestamp: float | None = None

    @field_validator("subject", "target_new")
    @classmethod
    def _not_blank(cls, value: str, info) -> str:
        if not value or not value.strip():
            raise ValueError(f"{info.field_name} is empty")
        return value

    @model_validator(mode="after")
    def _subject_slot(self) -> "EditRequest":
        if self.prompt.count("{}") != 1:
            raise ValueError(
                f'prompt must contain exactly one "{{}}" for the subject, got {self.prompt!r} '
                f"(subject {self.subject!r})"
            )
        if self.timestamp is not None and not math.isfinite(self.timestamp):
            raise ValueError("timestamp must be a finite number")
        texts = [self.case_id, self.subject, self.prompt, self.target_new, self.target_true, self.neighborhood_target]
        texts += [*self.paraphrase_prompts, *self.neighborhood_prompts, *self.generation_prompts]
        for text in texts:
            try:
                (text or "").encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a field holds text that is not valid Unicode (a lone surrogate)") from None
        return self

    @property
    def text(self) -> str:
        """The edited prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    @property
    def locality_target(self) -> str | None:
        return self.neighborhood_target if self.neighborhood_target is not None else self.target_true
