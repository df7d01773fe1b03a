"""Shared fixtures: the real SmolLM2 model (cached once), real text, tiny tokenizers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared 2-core machine two OpenMP threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sotu(shared_data) -> Path:
    return shared_data / "corpora" / "sotu"


@pytest.fixture(scope="session")
def smollm2_loaded():
    """SmolLM2-135M-Instruct from its PyPI wheel (converted once, then from the user cache)."""
    from prunekit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def smollm2(smollm2_loaded):
    """A private copy of the real model, free to prune."""
    return copy.deepcopy(smollm2_loaded.model), smollm2_loaded.tokenizer
