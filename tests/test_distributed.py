"""Data-parallel calibration: two gloo processes launched by torchrun give the single process's result."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from tiny import WORDS, save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_llama(root / "tiny")
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(8000)))
    return root


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _prune(material: Path, out: str, *extra: str, ranks: int = 1, launcher: list[str] | None = None):
    args = ["prune", str(material / "tiny"), "--calib", str(material / "calib.txt"), "--nsamples", "8", "--seqlen",
            "64", "--batch-size", "2", "--out", str(material / out), "--overwrite", *extra]
    if ranks == 1 and launcher is None:
        command = [sys.executable, "-m", "prunekit", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                   "--master-port", str(_port()), *(launcher or ["-m", "prunekit"]), *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, check=False)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("method,stream", [("wanda", "--stream"), ("sparsegpt", "--stream"), ("wanda", "--no-stream")])
def test_two_ranks_equal_one_process(material, method, stream):
    one = _prune(material, f"{method}{stream}-1", "--method", method, stream)
    two = _prune(material, f"{method}{stream}-2", "--method", method, stream, ranks=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    single, parallel = _weights(material / f"{method}{stream}-1"), _weights(material / f"{method}{stream}-2")
    for name, weight in single.items():  # whole batches per rank and float64 sums: the same bits
        assert torch.equal(parallel[name], weight), name
    manifest = json.loads((material / f"{method}{stream}-2" / "prunekit.json").read_text())
    if stream == "--stream":
        assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["backend"] == "gloo"
        assert manifest["distributed"]["bytes_reduced"] > 0
    else:
        assert manifest["options"]["world_size"] == 2


def test_two_ranks_same_flap_plan(material):
    one = _prune(material, "flap-1", "--method", "flap", "--sparsity", "0.3")
    two = _prune(material, "flap-2", "--method", "flap", "--sparsity", "0.3", ranks=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    plans = [json.loads((material / name / "config.json").read_text())["prunekit_structure"]
             for name in ("flap-1", "flap-2")]
    assert plans[0] == plans[1]
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(prunekit.load(material / "flap-1").model(ids).logits,
                                   prunekit.load(material / "flap-2").model(ids).logits, rtol=1e-4, atol=1e-4)


def test_more_ranks_than_windows(material):
    result = _prune(material, "few", "--method", "wanda", "--nsamples", "1", ranks=2)
    assert result.returncode != 0
    assert "2 ranks but only 1 calibration windows" in result.stderr


def test_ranks_that_disagree(material, tmp_path):
    wrapper = tmp_path / "disagree.py"
    wrapper.write_text("import os, sys\nfrom prunekit.cli import main\n"
                       "extra = ['--sparsity', '0.6'] if os.environ['RANK'] == '1' else []\n"
                       "main(sys.argv[1:] + extra)\n")
    result = _prune(material, "disagree", "--method", "wanda", ranks=2, launcher=[str(wrapper)])
    assert result.returncode != 0
    assert "ranks disagree on the recipe or model" in result.stderr


def test_backend_that_cannot_start(material):
    busy = socket.socket()  # rank 0 must host the rendezvous on MASTER_PORT: it is taken
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(busy.getsockname()[1])}
    result = subprocess.run([sys.executable, "-m", "prunekit", "prune", str(material / "tiny"), "--method", "wanda",
                             "--calib", str(material / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--out",
                             str(material / "never")], env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    busy.close()
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch.distributed could not start the gloo backend"), last
