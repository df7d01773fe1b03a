"""The paper's small parameter groups on a pruned model: linear biases, normalization weights, counts.

Biases: PERP trains the bias of every linear and adds a zero one where a layer has none (Llama-style models
have none). A bias is only worth training if the saved model can hold it: a structurally pruned folder
records which linears carry one (`prunekit_structure`), and a stock folder can only say so through its
config's switches (Llama's `attention_bias` and `mlp_bias`). Which linears a stock config can give a bias
is found by building the model class from the switched-on config on the meta device (no weights, no
guessing per family); linears no switch reaches keep what they have.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.adapters import get_adapter
from prunekit.adapters.base import is_prunable_linear
from prunekit.structured.shrink import SPEC_KEY

#: Config switches through which stock transformers classes give their linears a bias.
BIAS_SWITCHES = ("attention_bias", "mlp_bias")


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear of the decoder blocks, by full name, in execution order."""
    adapter = get_adapter(model)
    found: dict[str, nn.Module] = {}
    for index, block in enumerate(adapter.blocks()):
        for _group, modules in adapter.block_linears(block):
            for name, module in modules.items():
                found[f"{adapter.block_prefix(index)}.{name}"] = module
    return found


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """LayerNorm / RMSNorm modules (their weights, and biases where they have them)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) or type(module).__name__.lower().endswith("norm")}


def _bias_switches(model: nn.Module) -> dict[str, bool]:
    return {name: True for name in BIAS_SWITCHES if isinstance(getattr(model.config, name, None), bool)}


def storable_biases(model: nn.Module) -> set[str]:
    """Names of the block linears that a saved copy of `model` can give a bias (see the module docstring)."""
    linears = block_linears(model)
    if getattr(model.config, SPEC_KEY, None):
        return set(linears)
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    for name, value in _bias_switches(model).items():
        setattr(config, name, value)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    biased = {name for name, module in skeleton.named_modules()
              if is_prunable_linear(module) and getattr(module, "bias", None) is not None}
    return {name for name, module in linears.items() if name in biased or module.bias is not None}


@dataclass
class BiasRecord:
    """Which linears train a bias, and which of those got a new (zero) one."""

    trained: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    not_storable: list[str] = field(default_factory=list)


def add_biases(model: nn.Module) -> BiasRecord:
    """Give every block linear that can keep one a zero bias where it has none."""
    storable = storable_biases(model)
    record = BiasRecord()
    for name, module in block_linears(model).items():
        if name not in storable:
            record.not_storable.append(name)
            continue
        if module.bias is None:
            rows = module.weight.shape[1] if type(module).__name__ == "Conv1D" else module.weight.shape[0]
            module.bias = nn.Parameter(torch.zeros(rows, dtype=module.weight.dtype, device=module.weight.device))
            record.added.append(name)
        record.trained.append(name)
    return record


def record_biases(model: nn.Module, record: BiasRecord) -> None:
    """Make the saved config describe the added biases, so the folder reloads with them."""
    if not record.added:
        return
    spec = getattr(model.config, SPEC_KEY, None)
    if spec:
        adapter = get_adapter(model)
        for index, layer in enumerate(spec["layers"]):
            prefix = f"{adapter.block_prefix(index)}."
            names = [n.removeprefix(prefix) for n in record.added if n.startswith(prefix)]
            layer["bias"] = sorted(set(layer["bias"]) | set(names))
        return
    for name, value in _bias_switches(model).items():
        setattr(model.config, name, value)


def select_trainable(model: nn.Module, params: list[str], bias: BiasRecord | None) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the chosen groups' tensors (adapters are added separately)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    chosen: dict[str, nn.Parameter] = {}
    if "bias" in params and bias is not None:
        linears = block_linears(model)
        for name in bias.trained:
            chosen[f"{name}.bias"] = linears[name].bias
    if "norm" in params:
        for name, module in norm_modules(model).items():
            for pname, parameter in module.named_parameters(recurse=False):
                chosen[f"{name}.{pname}"] = parameter
    for parameter in chosen.values():
        parameter.requires_grad_(True)
    return chosen


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied head and embedding count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
