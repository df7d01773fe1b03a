"""Writing pruned models: HF folders that stock transformers loads, written atomically."""

from prunekit.export.save import check_output_dir, save_model

__all__ = ["check_output_dir", "save_model"]
