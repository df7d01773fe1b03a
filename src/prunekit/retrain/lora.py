"""Low-rank adapters that respect a sparsity mask: LoRA, ScaleLoRA and MaskLoRA (PERP, section 3).

Each adapter is a torch parametrization of a weight W (so any module, linear, Conv1D or embedding, uses it
unchanged), with A [r, in] and B [out, r] in peft's orientation:

* `lora`: W + (alpha / r) B A. Standard LoRA; merging it fills the pruned positions.
* `mask_lora`: W + (alpha / r) (B A) * M, with M = (W != 0) fixed when attached: the update never touches a
  pruned weight, so the merged matrix keeps exactly the input mask.
* `scale_lora`: W * (B A), with A and B filled with 1 / sqrt(r) so that B A = 1 at the start: a rank-r
  multiplicative rescaling, zero wherever W is zero.

peft has no masked variants, so the adapters are plain torch; peft serves where it fits: a plain LoRA that is
not merged is exported as a standard peft adapter (`PeftModel.from_pretrained(base, DIR)` loads it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError


class LowRank(nn.Module):
    """The update of one weight (see the module docstring); `transposed` for Conv1D's [in, out] layout."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, kind: str, transposed: bool = False):
        super().__init__()
        rows, cols = weight.shape[::-1] if transposed else weight.shape
        self.kind, self.rank, self.transposed = kind, rank, transposed
        self.scaling = 1.0 if kind == "scale_lora" else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(rows, rank, dtype=weight.dtype, device=weight.device))
        with torch.no_grad():
            if kind == "scale_lora":
                self.lora_A.fill_(1 / math.sqrt(rank))
                self.lora_B.fill_(1 / math.sqrt(rank))
            else:  # peft's default: Kaiming-uniform A, zero B, so the update starts at zero
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
        if kind == "mask_lora":  # the mask with the scaling folded in: one fused pass over the weight
            self.register_buffer("scaled_mask", (weight != 0).to(weight.dtype) * self.scaling, persistent=False)

    def product(self) -> torch.Tensor:
        """B A in the weight's own layout."""
        product = self.lora_B @ self.lora_A
        return product.t() if self.transposed else product

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Weight-sized passes cost as much as the layer's own matmul at small batches: one fused op each.
        if self.kind == "scale_lora":
            return weight * self.product()
        if self.kind == "mask_lora":
            return torch.addcmul(weight, self.product(), self.scaled_mask)
        return torch.add(weight, self.product(), alpha=self.scaling)


def check_rank(modules: dict[str, nn.Module], rank: int) -> None:
    """A rank above a layer's smaller side is no low-rank update: one line naming the layer."""
    for name, module in modules.items():
        rows, cols = module.weight.shape
        if rank > min(rows, cols):
            raise PrunekitError(f"LoRA rank {rank} is larger than layer {name} ({rows} x {cols}); "
                                f"accepted: a rank of at most {min(rows, cols)}")


def attach(modules: dict[str, nn.Module], rank: int, alpha: float, kind: str) -> dict[str, LowRank]:
    """Parametrize the weight of each module with its own adapter; modules sharing one weight (a tied
    embedding and head) share one adapter, so the update stays tied."""
    adapters: dict[str, LowRank] = {}
    by_weight: dict[int, LowRank] = {}
    for name, module in modules.items():
        weight = module.weight
        adapter = by_weight.get(id(weight))
        if adapter is None:
            adapter = LowRank(weight.detach(), rank, alpha, kind, transposed=type(module).__name__ == "Conv1D")
            by_weight[id(weight)] = adapter
            adapters[name] = adapter
        parametrize.register_parametrization(module, "weight", adapter)
    return adapters


@torch.no_grad()
def detach_all(modules: dict[str, nn.Module], merge: bool) -> None:
    """Remove the adapters; with `merge`, write each adapted weight into the original tensor (shared
    tensors once), else leave the original weights as they were."""
    merged: dict[int, torch.Tensor] = {}
    for module in modules.values():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        original = module.parametrizations.weight.original
        if merge and id(original) not in merged:
            merged[id(original)] = module.weight.detach().clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    if merge:
        for module in modules.values():
            value = merged.pop(id(module.weight), None)
            if value is not None:
                module.weight.copy_(value)


def export_peft(model: nn.Module, adapters: dict[str, LowRank], rank: int, alpha: float, folder: Path) -> None:
    """Write plain-LoRA adapters as a peft adapter folder (adapter_config.json + adapter_model.safetensors).

    `model` must hold the original weights (adapters detached); it is left as it was.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=sorted(adapters), init_lora_weights=False,
                        fan_in_fan_out=any(a.transposed for a in adapters.values()))
    peft_model = get_peft_model(model, config)
    try:
        with torch.no_grad():
            for name, adapter in adapters.items():
                layer = peft_model.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(adapter.lora_A)
                layer.lora_B["default"].weight.copy_(adapter.lora_B)
        peft_model.save_pretrained(str(folder))
    finally:
        peft_model.base_model.unload()
