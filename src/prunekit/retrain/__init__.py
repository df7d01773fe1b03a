"""PERP: parameter-efficient retraining after pruning (Zimmer et al., 2023).

config.py (the settings) → params.py (biases, norms, counts) and lora.py (LoRA, ScaleLoRA, MaskLoRA; merge;
peft export), put on and taken off by setup.py → train.py (the AdamW loop) with reconstruct.py (block-wise
mode) and checkpoint.py (safetensors + JSON) → run.py (`retrain`: checks, loop, merge, save).

The package is callable, so `prunekit.retrain(PRUNED_DIR, OUT, calib=...)` reads like `prunekit.prune(...)`.
"""

import sys
import types

from prunekit.retrain.config import LORA_KINDS, PARAM_SETS, RetrainConfig
from prunekit.retrain.run import RetrainReport, retrain

__all__ = ["LORA_KINDS", "PARAM_SETS", "RetrainConfig", "RetrainReport", "retrain"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> RetrainReport:
        return retrain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
