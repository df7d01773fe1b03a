"""The optimisation loop shared by both modes: AdamW, a warm-up schedule, clipping, progress, checkpoints.

As in the reference code (Hugging Face Trainer for retraining, a plain loop for reconstruction): AdamW,
`warmup` of the steps linear warm-up, then the chosen decay (transformers' schedulers), gradients clipped to
norm 1. The data of a step depends only on its index, so a resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.retrain.config import RetrainConfig

MAX_GRAD_NORM = 1.0

#: Called with (steps done, optimizer, scheduler, losses) when a checkpoint is due.
OnCheckpoint = Callable[[int, torch.optim.Optimizer, Any, list[float]], None]


@dataclass
class Resume:
    """Where an interrupted loop stands: its step, scheduler and optimizer settings, losses, saved tensors."""

    step: int
    scheduler: dict[str, Any]
    optimizer_groups: list[dict[str, Any]]
    losses: list[float]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def make_optimizer(params: dict[str, nn.Parameter], config: RetrainConfig, steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=round(config.warmup * steps),
                              num_training_steps=steps)
    return optimizer, scheduler


def optimize(params: dict[str, nn.Parameter], loss_at: Callable[[int], torch.Tensor], config: RetrainConfig, *,
             tokens_per_step: int, desc: str, progress: bool = True, resume: Resume | None = None,
             on_checkpoint: OnCheckpoint | None = None) -> list[float]:
    """Run `config.steps` steps of `loss_at(step)`; returns the loss of every step (resumed ones included)."""
    from tqdm.auto import tqdm

    from prunekit.retrain import checkpoint

    steps = config.steps
    optimizer, scheduler = make_optimizer(params, config, steps)
    losses: list[float] = []
    start = 0
    if resume is not None:
        checkpoint.restore(resume.tensors, params, optimizer, resume.optimizer_groups)
        scheduler.load_state_dict(resume.scheduler)
        losses, start = list(resume.losses), resume.step
    trainable = list(params.values())
    with tqdm(total=steps, initial=start, desc=desc, unit="step", file=sys.stderr, disable=not progress) as bar:
        for step in range(start, steps):
            t0 = time.perf_counter()
            loss = loss_at(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens_per_step / (time.perf_counter() - t0):.0f}")
            bar.update(1)
            done = step + 1
            if on_checkpoint is not None and config.save_every and done % config.save_every == 0 and done < steps:
                on_checkpoint(done, optimizer, scheduler, losses)
    return losses
