"""Hugging Face hub ids: fetch a snapshot's safetensors, config and tokenizer files, never its pickle files."""

from __future__ import annotations

from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.models.messages import one_line

HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")


def hub_snapshot(repo_id: str, *, revision: str | None, trust_remote_code: bool) -> Path:
    """The local folder of `repo_id` at `revision` (downloaded on first use by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    patterns = [*HUB_PATTERNS, "*.py"] if trust_remote_code else list(HUB_PATTERNS)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # network, auth, unknown repo or revision: all reported the same way
        raise PrunekitError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({one_line(error)}); check the id, "
            f"network access and HF_TOKEN, or pass an existing local folder or an alias"
        ) from error
