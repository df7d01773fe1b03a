"""Data-parallel calibration on torch.distributed: `torchrun --nproc-per-node N -m prunekit prune ...`.

torchrun sets RANK / WORLD_SIZE / MASTER_ADDR in each process's environment; prunekit starts the process group
(gloo on CPU, nccl on GPU) and hands the engine a `DistributedReducer`: each rank runs every block on its share
of the calibration rows, statistics are all-reduced before a decision, rank 0 decides and its result is
broadcast, and only rank 0 writes output, progress and the manifest. What crosses the network per block is
the statistics and, for the sequential pass, the block's pruned linears (docs/scale.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Any

import torch

from prunekit.engine.reduce import DistributedReducer, LocalReducer
from prunekit.errors import PrunekitError


def world_size_from_environment() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise PrunekitError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not a number") from None


def start(device: torch.device, timeout_minutes: float = 60.0) -> LocalReducer:
    """The reducer for this process: local, or a started process group when launched by torchrun."""
    if world_size_from_environment() <= 1:
        return LocalReducer()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        except Exception as error:  # bad address, port in use, backend not built in: one line
            message = " ".join(str(error).split())[:200]
            raise PrunekitError(f"torch.distributed could not start the {backend} backend ({message}); check "
                                "MASTER_ADDR/MASTER_PORT and that every rank was launched by torchrun") from None
    return DistributedReducer()


def backend_name(reducer: LocalReducer) -> str | None:
    if reducer.world_size == 1:
        return None
    import torch.distributed as dist

    return str(dist.get_backend())


def agree(reducer: LocalReducer, what: dict[str, Any]) -> None:
    """Every rank must run the same recipe on the same model: their sha256 is compared before any work."""
    if reducer.world_size == 1:
        return
    import torch.distributed as dist

    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).digest()
    mine = torch.tensor(list(digest), dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(reducer.world_size)]
    dist.all_gather(gathered, mine)
    differing = [rank for rank, theirs in enumerate(gathered) if not torch.equal(theirs, mine)]
    if differing:
        raise PrunekitError(f"ranks disagree on the recipe or model (rank {reducer.rank} differs from ranks "
                            f"{differing}); launch every rank with the same command and files")


def check_rows(reducer: LocalReducer, rows: int) -> None:
    if rows < reducer.world_size:
        raise PrunekitError(f"{reducer.world_size} ranks but only {rows} calibration windows: every rank needs at "
                            f"least one; pass --nsamples {reducer.world_size} or more, or fewer ranks")


def finish(reducer: LocalReducer) -> None:
    """Wait for every rank, then close the process group."""
    if reducer.world_size == 1:
        return
    import torch.distributed as dist

    reducer.barrier()
    dist.destroy_process_group()
