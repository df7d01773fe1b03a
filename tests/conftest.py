"""Shared fixtures: the real SmolLM2 model (cached once), real text (embedded in the package), tiny tokenizers."""

from __future__ import annotations

import copy
from importlib import resources
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
def embedded_sotu() -> Path:
    """The 2020 and 2021 State of the Union addresses shipped inside the package: real text in every clone."""
    return Path(str(resources.files("prunekit.data").joinpath("embedded/sotu_2020_2021.txt")))


@pytest.fixture(scope="session")
def sotu(embedded_sotu, tmp_path_factory) -> Path:
    """A folder with train.txt (the 2020 address, ~7.3 k SmolLM2 tokens) and test.txt (2021, ~10.4 k): real,
    disjoint calibration and evaluation text from the package, so the quality tests run without ../shared/data."""
    addresses = embedded_sotu.read_text(encoding="utf-8").split("\n\n")
    assert len(addresses) == 2, "the embedded text holds the 2020 and the 2021 address"
    folder = tmp_path_factory.mktemp("sotu")
    (folder / "train.txt").write_text(addresses[0], encoding="utf-8")
    (folder / "test.txt").write_text(addresses[1], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def smollm2_loaded():
    """SmolLM2-135M-Instruct from its PyPI wheel (converted once, then from the user cache)."""
    from prunekit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def smollm2(smollm2_loaded):
    """A private copy of the real model, free to prune."""
    return copy.deepcopy(smollm2_loaded.model), smollm2_loaded.tokenizer
