"""The emulator's knobs: timing and fault injection, as one validated pydantic model.

Every knob can be changed at runtime (``Emulator.configure``, ``POST /_emulator/faults``);
the CLI exposes each one as a flag whose help text is the field's description.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TransientErrorType = Literal["overloaded_error", "api_error", "rate_limit_error", "timeout_error"]

# Status codes `fail_next` accepts, with the error type the API puts in their envelope.
HTTP_FAULT_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# The model ids the API's spec lists for Messages (the Model schema's constants).
KNOWN_MODELS: tuple[str, ...] = (
    "claude-opus-4-7", "claude-mythos-preview", "claude-opus-4-6", "claude-sonnet-4-6",
    "claude-haiku-4-5", "claude-haiku-4-5-20251001", "claude-opus-4-5",
    "claude-opus-4-5-20251101", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929",
    "claude-opus-4-1", "claude-opus-4-1-20250805", "claude-opus-4-0", "claude-opus-4-20250514",
    "claude-sonnet-4-0", "claude-sonnet-4-20250514", "claude-3-haiku-20240307",
)  # fmt: skip


class EmulatorConfig(BaseModel):
    """How the emulator behaves. All rates are fractions in [0, 1]; all times are seconds."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(default=0, description="Seeds every random choice, so a run can be replayed")
    processing_seconds: float = Field(
        default=2.0,
        ge=0.0,
        description="How long a batch stays in_progress after create (0: ended on first look). "
        "Values past 24 h make the late requests expire",
    )
    cancel_seconds: float = Field(
        default=0.5,
        ge=0.0,
        description="How long a canceled batch stays 'canceling' before it ends",
    )
    models: tuple[str, ...] = Field(
        default=KNOWN_MODELS,
        description="Model ids the emulator answers for; a request for another comes back "
        "errored with not_found_error, as the API's does ('*': answer for any)",
    )
    errored_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Fraction of requests that come back errored"
    )
    errored_types: tuple[TransientErrorType, ...] = Field(
        default=("overloaded_error", "api_error"),
        min_length=1,
        description="Error types drawn (per custom_id) for errored_rate",
    )
    invalid_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of requests that come back errored with invalid_request_error",
    )
    expired_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Fraction of requests that come back expired"
    )
    http_429_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of API calls answered 429 rate_limit_error",
    )
    http_500_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Fraction of API calls answered 500 api_error"
    )
    http_529_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of API calls answered 529 overloaded_error",
    )
    retry_after: float = Field(
        default=0.0,
        ge=0.0,
        description="Value of the retry-after header on 429 answers (0: omit it)",
    )
    retry_after_ms: float = Field(
        default=0.0,
        ge=0.0,
        description="Value of the retry-after-ms header on 429 answers (0: omit it); the SDK "
        "prefers it to retry-after",
    )
    should_retry: Literal["", "true", "false"] = Field(
        default="",
        description="x-should-retry header on injected HTTP faults ('': omit it); the SDK "
        "obeys it over the status code",
    )
    slow_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Fraction of API calls delayed by slow_seconds"
    )
    slow_seconds: float = Field(
        default=0.0, ge=0.0, description="Delay of a slow call (real seconds, not emulator clock)"
    )
    results_break_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of results downloads whose connection drops mid-stream",
    )
    results_break_after: int = Field(
        default=1, ge=0, description="Lines sent before a broken results download drops"
    )
    fail_next: list[int] = Field(
        default_factory=list,
        description="Status codes for the next API calls, in order (e.g. 429 529 500); "
        "each is used once, before any rate applies",
    )

    def knows_model(self, model: str) -> bool:
        """Whether a request for ``model`` is answered (else: not_found_error)."""
        return model in self.models or "*" in self.models

    @field_validator("fail_next")
    @classmethod
    def _known_statuses(cls, codes: list[int]) -> list[int]:
        unknown = [c for c in codes if c not in HTTP_FAULT_TYPES]
        if unknown:
            known = ", ".join(str(c) for c in sorted(HTTP_FAULT_TYPES))
            raise ValueError(f"unsupported status {unknown[0]} (supported: {known})")
        return codes

    def http_fault_statuses(self) -> list[tuple[int, float]]:
        """The rate-driven HTTP faults as (status, rate) pairs, in the order they are drawn."""
        return [(429, self.http_429_rate), (500, self.http_500_rate), (529, self.http_529_rate)]
