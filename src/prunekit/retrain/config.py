"""What a PERP run trains and how: the typed settings, checked before anything is loaded."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from prunekit.errors import PrunekitError

#: The paper's parameter groups: linear biases (added where missing), normalization weights, the LM head
#: (a low-rank update, as the reference code does), and low-rank adapters on the pruned linears.
PARAM_SETS = ("bias", "norm", "head", "lora")
LORA_KINDS = ("lora", "scale_lora", "mask_lora")
SCHEDULES = ("linear", "cosine", "constant")


class RetrainConfig(BaseModel):
    """Settings of one run. Defaults follow the reference code (rank 16, alpha 32, AdamW, 10 % linear warm-up
    then linear decay, no weight decay) with a CPU-sized budget of data."""

    model_config = ConfigDict(extra="forbid")

    params: list[str] = ["bias", "norm", "head", "lora"]
    lora_kind: Literal["lora", "scale_lora", "mask_lora"] = "mask_lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    #: Plain LoRA fills pruned weights when merged: it is kept apart (a peft adapter) unless this is set.
    merge_lora: bool = False
    mode: Literal["retrain", "reconstruct"] = "retrain"
    steps: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    batch_size: int = 8
    seqlen: int = 512
    #: Reconstruct mode only: calibration windows whose block activations are kept and cycled.
    nsamples: int = 128
    seed: int = 0
    save_every: int = 50

    @field_validator("params", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("params")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in PARAM_SETS]
        if unknown:
            raise ValueError(f"unknown parameter set {unknown[0]!r}; accepted: {', '.join(PARAM_SETS)}")
        if not value:
            raise ValueError(f"no parameter set given; accepted: {', '.join(PARAM_SETS)}")
        return list(dict.fromkeys(value))

    @field_validator("lora_rank", "steps", "batch_size", "nsamples")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"{value} must be an integer >= 1")
        return value

    @field_validator("seqlen")
    @classmethod
    def _seqlen(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"{value} must be an integer >= 2")
        return value

    @field_validator("lr", "lora_alpha")
    @classmethod
    def _positive_float(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"{value} must be > 0")
        return value

    @field_validator("warmup")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"{value} must be in [0, 1)")
        return value

    @field_validator("weight_decay", "save_every")
    @classmethod
    def _non_negative(cls, value):
        if value < 0:
            raise ValueError(f"{value} must be >= 0")
        return value

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.params


def build_config(**fields) -> RetrainConfig:
    """A config from keyword fields (None = default), with a bad value as one line naming the field."""
    try:
        return RetrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise PrunekitError(f"retrain {where}: {message}") from None
