"""Model loading: a MODEL spec (alias, folder, .gguf file or hub id) becomes a plain fp32 causal LM."""

from prunekit.models.aliases import ALIASES, DEFAULT_ALIAS, WheelAlias
from prunekit.models.loading import LoadedModel, load_model, model_cache_dir

__all__ = ["ALIASES", "DEFAULT_ALIAS", "LoadedModel", "WheelAlias", "load_model", "model_cache_dir"]
