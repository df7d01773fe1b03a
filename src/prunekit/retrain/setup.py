"""What a run trains on the model: checked first, put on, then merged off again with the mask verified.

`Trainables.inspect` checks the settings against the model without changing it (mask_lora needs zeros,
ranks fit); `attach` adds the biases, unfreezes the groups and parametrizes the adapters, all starting at
the identity (zero biases, zero or unit updates), so the model computes what it computed before; `detach`
merges (or exports plain LoRA as a peft adapter) and checks that every pruned weight is still zero.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.errors import PrunekitError
from prunekit.retrain.config import RetrainConfig
from prunekit.retrain.lora import LowRank, attach, check_rank, detach_all, export_peft
from prunekit.retrain.params import (
    BiasRecord,
    add_biases,
    block_linears,
    count_parameters,
    norm_modules,
    record_biases,
    select_trainable,
)

ADAPTER_DIR = "adapter"


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LM head, plus the input embedding when the two share one matrix (the update must stay tied)."""
    adapter = get_adapter(model)
    head = adapter.head()
    modules = {adapter.head_path: head}
    for path, embedding in model.named_modules():
        if path in adapter.embeddings_paths and getattr(embedding, "weight", None) is head.weight:
            modules[path] = embedding
    return modules


def _zeros(linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach() == 0 for name, module in linears.items()}


def _zero_fraction(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


@dataclass
class Trainables:
    config: RetrainConfig
    linears: dict[str, nn.Module]
    input_zeros: dict[str, torch.Tensor]
    head: dict[str, nn.Module]
    base_params: int
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    adapters: dict[str, LowRank] = field(default_factory=dict)
    biases: BiasRecord | None = None
    norm_tensors: int = 0

    @property
    def sparse(self) -> bool:
        return any(bool(z.any()) for z in self.input_zeros.values())

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @classmethod
    def inspect(cls, model: nn.Module, config: RetrainConfig, source: Path) -> Trainables:
        """Every check against the model, before anything changes."""
        linears = block_linears(model)
        found = cls(config, linears, _zeros(linears), {}, count_parameters(model))
        if config.uses_lora:
            if config.lora_kind == "mask_lora" and not found.sparse:
                raise PrunekitError(f"--lora-kind mask_lora needs pruned weights to mask, but {source} has none "
                                    "(dense or structurally pruned); accepted: lora or scale_lora")
            check_rank(linears, config.lora_rank)
        if "head" in config.params and config.mode == "retrain":  # the head belongs to no block
            found.head = head_modules(model)
            check_rank(found.head, config.lora_rank)
        return found

    def attach(self, model: nn.Module) -> None:
        config = self.config
        self.biases = add_biases(model) if "bias" in config.params else None
        self.params = select_trainable(model, config.params, self.biases)
        norms = set(norm_modules(model))
        self.norm_tensors = sum(1 for name in self.params if name.rsplit(".", 1)[0] in norms)
        torch.manual_seed(config.seed)
        if config.uses_lora:
            self.adapters = attach(self.linears, config.lora_rank, config.lora_alpha, config.lora_kind)
        head_zeros = any(bool((m.weight == 0).any()) for m in self.head.values())
        head_adapters = attach(self.head, config.lora_rank, config.lora_alpha, "mask_lora" if head_zeros else "lora")
        for name, adapter in {**self.adapters, **head_adapters}.items():
            self.params[f"{name}.lora_A"], self.params[f"{name}.lora_B"] = adapter.lora_A, adapter.lora_B

    def detach(self, model: nn.Module, staging: Path) -> dict[str, Any]:
        """Merge everything into the weights (plain LoRA on a sparse model: a peft adapter instead, unless
        `merge_lora`); returns the record's `parameters` and `mask` entries."""
        config = self.config
        detach_all(self.head, merge=True)
        plain_on_sparse = config.lora_kind == "lora" and self.sparse
        merge = bool(self.adapters) and (not plain_on_sparse or config.merge_lora)
        if merge and plain_on_sparse:
            warnings.warn("merging plain LoRA fills the pruned weights: the saved model is no longer sparse "
                          "(use mask_lora or scale_lora, or leave the adapter unmerged)", stacklevel=3)
        detach_all(self.linears, merge=merge)
        if self.adapters and not merge:
            export_peft(model, self.adapters, config.lora_rank, config.lora_alpha, staging / ADAPTER_DIR)
        output_zeros = _zeros(self.linears)
        kept = all(torch.equal(self.input_zeros[n], output_zeros[n]) for n in self.linears)
        if self.adapters and config.lora_kind != "lora" and not kept:
            raise RuntimeError(f"{config.lora_kind} changed the pruning mask; this is a bug")
        if self.biases is not None:
            record_biases(model, self.biases)
        skipped = "skipped: reconstruct mode fits blocks only" if "head" in config.params else None
        return {
            "parameters": {
                "sets": config.params, "model": self.base_params, "trainable": self.count,
                "trainable_fraction": self.count / self.base_params,
                "biases": None if self.biases is None else {
                    "trained": len(self.biases.trained), "added": len(self.biases.added),
                    "not_storable": self.biases.not_storable},
                "norm_tensors": self.norm_tensors,
                "head": {"modules": sorted(self.head), "rank": config.lora_rank} if self.head else skipped,
                "lora": {"kind": config.lora_kind, "rank": config.lora_rank, "alpha": config.lora_alpha,
                         "layers": len(self.adapters), "merged": merge,
                         "adapter_folder": None if merge else ADAPTER_DIR} if self.adapters else None,
            },
            "mask": {"zero_fraction_before": _zero_fraction(self.input_zeros),
                     "zero_fraction_after": _zero_fraction(output_zeros), "kept": kept},
        }
