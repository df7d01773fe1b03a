"""Inference speed of pruned models against their dense base: prefill and greedy-decode tokens/s.

Removing heads and channels buys speed only if it is measured the way a model is served. Two runtimes:

* ``eager``: ``model.generate()`` as transformers runs it by default (dynamic KV cache, one Python call per
  operator). Every model pays the same per-operator cost (about 11 ms of a 55 ms token for SmolLM2-135M on
  one CPU thread), which hides part of what pruning saves.
* ``compiled``: a static KV cache and the one-token forward compiled once by ``torch.compile`` (inductor),
  then a plain greedy loop. This is how latency-sensitive serving runs a model, and what the saving is worth
  there. On CPU inductor needs a C++ compiler.
* ``semi-structured`` (CUDA only): every linear whose weight holds a 2:4 pattern runs on torch's semi-structured
  sparse kernels (`to_sparse_semi_structured`, fp16/bf16, compute capability 8.0+): the one place where a 2:4
  model buys speed today. Prefill and eager decode are timed on that copy of the model.

Models are timed interleaved and the median over repeats is kept, because absolute numbers drift on a
shared machine: the ratios to the baseline are what to read.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from prunekit.errors import PrunekitError

RUNTIMES = ("eager", "compiled", "semi-structured")


def check_runtimes(runtimes: list[str] | tuple[str, ...], device: str = "cpu") -> tuple[str, ...]:
    """Validate runtime names, and that each can run here (`eager` is always timed: it is the reference)."""
    if not runtimes:
        raise PrunekitError(f"no runtime given; accepted: {', '.join(RUNTIMES)}")
    for name in runtimes:
        if name not in RUNTIMES:
            raise PrunekitError(f"unknown runtime {name!r}; accepted: {', '.join(RUNTIMES)}")
    on_cpu = torch.device(device).type == "cpu"
    if "compiled" in runtimes and on_cpu and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise PrunekitError("runtime 'compiled' needs a C++ compiler (g++ or clang++) for torch inductor on CPU; "
                            "install one or use --runtime eager")
    if "semi-structured" in runtimes and (on_cpu or not torch.cuda.is_available()):
        raise PrunekitError("runtime 'semi-structured' needs a CUDA GPU (2:4 sparse tensor cores, compute capability "
                            "8.0+) and --device cuda; accepted here: eager, compiled")
    return tuple(dict.fromkeys(["eager", *runtimes]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def semi_structured_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """A copy of `model` whose 2:4-sparse linears use torch's semi-structured kernels; returns it and the count."""
    import copy

    from torch.sparse import to_sparse_semi_structured

    from prunekit.pruning.masks import follows_nm

    converted = copy.deepcopy(model)
    count = 0
    for module in converted.modules():
        if isinstance(module, torch.nn.Linear) and follows_nm(module.weight.detach(), 2, 4):
            try:
                module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()),
                                                   requires_grad=False)
                count += 1
            except (RuntimeError, ValueError):  # shapes or dtype the kernels do not take: stays dense
                continue
    return converted, count


@torch.inference_mode()
def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """One forward over `ids` that builds the KV cache and keeps the last logits, as generate() does."""
    _sync(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.inference_mode()
def eager_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy `generate()` with transformers' defaults; returns the new tokens."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False)
    return out[:, prompt.shape[1]:]


class CompiledDecoder:
    """Greedy decoding over a static KV cache with the one-token forward compiled by torch.compile.

    The graph is specialised to the cache length, so one decoder serves one (prompt + new tokens) length;
    the first call compiles (tens of seconds on CPU), later calls reuse the kernels. `dynamic=None` lets
    dynamo turn a value that changes every step (the sliding-window cache's position counter in Gemma 3)
    into a symbol after one recompile instead of recompiling per token.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        import torch._dynamo

        # every model of a class shares one forward code object, and dynamo caps its compiled variants (8);
        # timing several models in one process needs one variant each
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.model = model
        self._step: Callable[..., Any] = torch.compile(model.forward, fullgraph=True, dynamic=None)

    @torch.inference_mode()
    def __call__(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        from transformers import StaticCache

        length, device = prompt.shape[1], prompt.device
        cache = StaticCache(config=self.model.config, max_cache_len=length + new_tokens)
        out = self.model(input_ids=prompt, cache=cache, cache_position=torch.arange(length, device=device),
                         use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        produced = [token]
        for step in range(new_tokens - 1):
            position = torch.tensor([length + step], device=device)
            logits = self._step(input_ids=token, cache=cache, cache_position=position,
                                position_ids=position[None], use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            produced.append(token)
        return torch.cat(produced, dim=1)


@dataclass
class ModelSpeed:
    """Median speed of one model; `*_speedup` is relative to the baseline of the same run."""

    parameters: int
    prefill_tok_s: float
    decode_tok_s: dict[str, float]
    prefill_speedup: float = 1.0
    decode_speedup: dict[str, float] = field(default_factory=dict)
    same_tokens_as_eager: bool | None = None
    seconds: dict[str, list[float]] = field(default_factory=dict)
    #: prefill of the semi-structured copy (CUDA), and how many linears it runs sparse
    semi_structured_prefill_tok_s: float | None = None
    semi_structured_linears: int | None = None


@dataclass
class SpeedReport:
    """Speeds of every model, the protocol that produced them, and the baseline they are compared to."""

    baseline: str
    models: dict[str, ModelSpeed]
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_speed(models: Mapping[str, torch.nn.Module], ids: torch.Tensor, *, prompt_tokens: int = 32,
                  new_tokens: int = 128, repeats: int = 3, runtimes: tuple[str, ...] = ("eager", "compiled"),
                  log: Callable[[str], None] | None = None, device: str = "cpu") -> SpeedReport:
    """Time prefill of `ids` (1 x n) and greedy decode of `new_tokens` after its first `prompt_tokens`.

    The first model is the baseline. Each runtime is warmed up (and compiled) on the exact lengths it is
    timed on; then every repeat times every model in turn. Models and ids are moved to `device`.
    """
    runtimes = check_runtimes(runtimes, device)
    if not models:
        raise PrunekitError("no model to time")
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise PrunekitError(f"ids must be one sequence of shape (1, n), got {tuple(ids.shape)}")
    if not 1 <= prompt_tokens <= ids.shape[1]:
        raise PrunekitError(f"prompt_tokens={prompt_tokens} must be between 1 and the {ids.shape[1]} tokens given")
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if value < 1:
            raise PrunekitError(f"{name}={value} must be at least 1")
    say = log or (lambda _message: None)
    target = torch.device(device)
    ids = ids.to(target)
    prompt = ids[:, :prompt_tokens]
    decoders: dict[str, dict[str, Callable[[torch.Tensor, int], torch.Tensor]]] = {}
    sparse: dict[str, tuple[torch.nn.Module, int]] = {}
    same: dict[str, bool | None] = {}
    for name, model in models.items():
        model.eval().to(target)
        decoders[name] = {"eager": lambda p, n, m=model: eager_decode(m, p, n)}
        if "compiled" in runtimes:
            decoders[name]["compiled"] = CompiledDecoder(model)
        if "semi-structured" in runtimes:
            sparse[name] = semi_structured_copy(model)
            decoders[name]["semi-structured"] = lambda p, n, m=sparse[name][0]: eager_decode(m, p, n)
        start = time.perf_counter()
        prefill_seconds(model, ids[:, : min(64, ids.shape[1])])
        tokens = {runtime: decoders[name][runtime](prompt, new_tokens) for runtime in runtimes}
        same[name] = torch.equal(tokens["eager"], tokens["compiled"]) if "compiled" in tokens else None
        say(f"speed: {name} warmed up in {time.perf_counter() - start:.0f}s")
    times = {name: {"prefill": [], "semi-structured prefill": [], **{runtime: [] for runtime in runtimes}}
             for name in models}
    for repeat in range(repeats):
        for name, model in models.items():
            times[name]["prefill"].append(prefill_seconds(model, ids))
            if name in sparse:
                times[name]["semi-structured prefill"].append(prefill_seconds(sparse[name][0], ids))
            for runtime in runtimes:
                _sync(target)
                start = time.perf_counter()
                decoders[name][runtime](prompt, new_tokens)
                _sync(target)
                times[name][runtime].append(time.perf_counter() - start)
        say(f"speed: repeat {repeat + 1}/{repeats} done")
    baseline = next(iter(models))
    rows: dict[str, ModelSpeed] = {}
    for name, model in models.items():
        t = times[name]
        rows[name] = ModelSpeed(
            parameters=sum(p.numel() for p in model.parameters()),
            prefill_tok_s=ids.shape[1] / statistics.median(t["prefill"]),
            decode_tok_s={runtime: new_tokens / statistics.median(t[runtime]) for runtime in runtimes},
            same_tokens_as_eager=same[name], seconds=t)
        if name in sparse:
            rows[name].semi_structured_prefill_tok_s = ids.shape[1] / statistics.median(t["semi-structured prefill"])
            rows[name].semi_structured_linears = sparse[name][1]
    for row in rows.values():
        row.prefill_speedup = row.prefill_tok_s / rows[baseline].prefill_tok_s
        row.decode_speedup = {r: row.decode_tok_s[r] / rows[baseline].decode_tok_s[r] for r in runtimes}
    protocol = {"prefill_tokens": ids.shape[1], "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                "repeats": repeats, "runtimes": list(runtimes), "threads": torch.get_num_threads(),
                "device": str(target), "dtype": str(next(iter(models.values())).dtype).replace("torch.", ""),
                "statistic": "median", "order": "interleaved"}
    return SpeedReport(baseline=baseline, models=rows, protocol=protocol)


def speed_ids(source: str, tokenizer: Any, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of a text SOURCE (no special tokens), as a (1, tokens) batch."""
    from prunekit.data.sources import TokenSource, resolve_source, tokenize_documents

    resolved = resolve_source(source, split="test")
    if isinstance(resolved, TokenSource):
        ids = resolved.input_ids.reshape(-1)
    else:
        ids, _ = tokenize_documents(tokenizer, resolved.documents, max_tokens=tokens)
    if ids.numel() < tokens:
        raise PrunekitError(f"source {source!r} has {ids.numel()} tokens; the prefill needs {tokens}")
    return ids[:tokens].reshape(1, -1).long()
