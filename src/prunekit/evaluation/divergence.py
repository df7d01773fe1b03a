"""How far a pruned model's next-token distributions moved from the dense model's.

Perplexity only looks at the probability of the true token; Jensen–Shannon divergence (JSD) to the dense
model looks at the whole distribution (Khanal & Capone, 2024). Over the windows of the perplexity
protocol (same text, windows, BOS choice) we measure per predicted token:

  * JSD(P_dense, Q_pruned) in nats (0 ≤ JSD ≤ ln 2), KL(P_dense || Q_pruned) in nats,
  * top-1 agreement (the arg-max tokens are equal),
and report mean, median, p95 and a histogram of the per-token JSD, plus both perplexities.

Streaming: the dense model runs first and its log-probs are cached on disk, one safetensors file per
batch, in a compact form: the top-k log-probs and their token ids, the log of the remaining mass (a
logsumexp over the tail, not 1 - sum) and the log-prob of the true next token. The pruned model then
runs alone, batch by batch, against that cache, so the two models never need to be in memory together
and neither model's logits for the whole text are ever held.

Approximation (topk < vocab): the tail outside the dense top-k is treated as one bucket, i.e. JSD and KL
are computed between the two distributions coarsened to {top-k tokens, "other"}. By the data-processing
inequality both are lower bounds of the exact values; the gap is bounded by the dense tail mass, which is
reported (`tail_mass_mean`). With topk >= vocab the cache holds every log-prob and the result is exact.
Measured on SmolLM2-135M (vocab 49152; 2 x 256 tokens of SOTU, magnitude 30 % / 50 %): the dense tail
mass is 12 % beyond the top 64, 6 % beyond 256, 2 % beyond 1024, and the mean JSD is underestimated
by about 21 %, 11 % and 4 % respectively; hence the default top-1024 (8 KiB per token: fp32 values and
int32 ids, vs 96 KiB for full fp16 log-probs). Use topk >= vocab when the text is small and exactness matters.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from prunekit.data.sources import TextSource, TokenSource, sha256_ids
from prunekit.errors import PrunekitError
from prunekit.files import (
    atomic_save_tensors,
    atomic_write_json,
    is_prunekit_output,
    new_staging_dir,
    publish_dir,
    write_marker,
)

DEFAULT_TOPK = 1024
HIST_BINS = 40
LN2 = math.log(2.0)
CACHE_FORMAT = "prunekit.dense-logprobs.v1"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id) and special tokens: equal iff the models tokenize alike."""
    if tokenizer is None:
        return ""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    return hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=False).encode()).hexdigest()


def _logits_width(model: Any) -> int | None:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, TypeError):
        return getattr(getattr(model, "config", None), "vocab_size", None)


@dataclass
class ReferenceCache:
    """The dense model's compact log-probs on disk plus what they were computed over."""

    folder: Path
    meta: dict[str, Any]

    @property
    def batches(self) -> int:
        return int(self.meta["batches"])

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(self.folder / f"batch_{i:05d}.safetensors")

    @classmethod
    def open(cls, folder: str | Path) -> ReferenceCache:
        path = Path(folder) / "meta.json"
        if not path.exists():
            raise PrunekitError(f"{folder} is not a dense log-prob cache (no meta.json)")
        meta = json.loads(path.read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise PrunekitError(f"{folder} has cache format {meta.get('format')!r}; accepted: {CACHE_FORMAT}")
        return cls(Path(folder), meta)


@dataclass
class DivergenceResult:
    """JSD / KL / top-1 agreement of a model against a dense reference, with the per-token distribution."""

    jsd_mean: float
    jsd_median: float
    jsd_p95: float
    kl_mean: float
    top1_agreement: float
    tokens: int
    windows: int
    seqlen: int
    bos: bool
    topk: int
    exact: bool
    tail_mass_mean: float
    perplexity: float  # of the evaluated (pruned) model, same windows as the perplexity protocol
    reference_perplexity: float
    histogram: dict[str, list[float]] = field(default_factory=dict)  # edges (nats) and counts
    source: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    protocol: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _forward_logprobs(model: Any, batch: torch.Tensor):
    """fp32 log-probs [T-1, V] of the predicted positions of each row (position t predicts token t+1).

    Yielded one row at a time so only one row's fp32 copy exists besides the batch's logits.
    """
    out = model(input_ids=batch, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    for i in range(batch.shape[0]):
        yield torch.log_softmax(logits[i, :-1].float(), dim=-1)


def _prepare(model: Any, tokenizer: Any, source: Any, *, seqlen: int, bos: bool, split: str,
             max_windows: int | None) -> tuple[torch.Tensor, dict[str, Any], int]:
    """The perplexity protocol's windows (BOS prepended when asked) and checks."""
    from prunekit.evaluation.perplexity import _embedding_rows, _windows

    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise PrunekitError(f"seqlen {seqlen!r} is invalid; accepted: an integer >= 2")
    if isinstance(source, str) and source.strip().lower() == "self":
        raise PrunekitError("source 'self' is for calibration only; accepted for divergence: a text source")
    windows, prov, dropped = _windows(source, tokenizer, seqlen=seqlen, split=split, max_windows=max_windows)
    rows = _embedding_rows(model)
    if rows is not None and int(windows.max()) >= rows:
        raise PrunekitError(f"token id {int(windows.max())} is beyond the model's {rows} embeddings")
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise PrunekitError("bos=True but the tokenizer has no BOS token; accepted: bos=False for this model")
        windows = torch.cat([torch.full((windows.shape[0], 1), int(bos_id)), windows], dim=1)
    return windows, prov, dropped


def cache_reference(
    model: Any,
    tokenizer: Any,
    source: str | list[str] | TextSource | TokenSource,
    folder: str | Path,
    *,
    seqlen: int,
    batch_size: int = 8,
    bos: bool = False,
    split: str = "test",
    max_windows: int | None = None,
    topk: int = DEFAULT_TOPK,
    progress: bool | None = None,
) -> ReferenceCache:
    """Run the dense `model` over SOURCE's windows and write its compact log-probs into `folder`.

    The cache is built in a staging folder beside `folder` and renamed into place when complete; an existing
    `folder` is replaced only if it is an earlier cache or empty."""
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise PrunekitError(f"topk {topk!r} is invalid; accepted: an integer >= 1 (>= vocab for exact)")
    windows, prov, dropped = _prepare(model, tokenizer, source, seqlen=seqlen, bos=bos, split=split,
                                      max_windows=max_windows)
    out = Path(folder)
    earlier_cache = (out / "meta.json").is_file()
    if out.exists() and not (earlier_cache or (out.is_dir() and not any(out.iterdir()))):  # only ours
        raise PrunekitError(f"cache folder {out} exists and is not a dense log-prob cache; accepted: a new folder")
    staging = new_staging_dir(out)
    try:
        meta = _write_cache(model, windows, staging, batch_size=batch_size, topk=topk, progress=progress,
                            seqlen=seqlen, bos=bos, prov=prov, dropped=dropped, tokenizer=tokenizer)
        write_marker(staging, "cache")
        if earlier_cache and not is_prunekit_output(out):  # a cache from before markers: ours all the same
            shutil.rmtree(out)
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ReferenceCache(out, meta)


def _write_cache(model: Any, windows: torch.Tensor, out: Path, *, batch_size: int, topk: int, progress: bool | None,
                 seqlen: int, bos: bool, prov: dict[str, Any], dropped: int, tokenizer: Any) -> dict[str, Any]:
    """The dense pass: one safetensors file per batch, then the windows, then meta.json, which marks it complete."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nwin = int(windows.shape[0])
    vocab = None
    k = topk
    nll = 0.0
    show = sys.stderr.isatty() if progress is None else progress
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=nwin, desc="dense log-probs", unit="win", file=sys.stderr,
                                          disable=not show) as bar:
            for i, start in enumerate(range(0, nwin, batch_size)):
                batch = windows[start:start + batch_size].to(device)
                rows: dict[str, list[torch.Tensor]] = {"topk_logp": [], "topk_index": [], "rest_logp": [],
                                                       "target_logp": []}
                for r, logp in enumerate(_forward_logprobs(model, batch)):
                    vocab = int(logp.shape[-1])
                    k = min(topk, vocab)
                    values, index = logp.topk(k, dim=-1)
                    target = logp.gather(-1, batch[r, 1:, None]).squeeze(-1)
                    nll -= float(target.double().sum())
                    if k < vocab:
                        rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1)
                    else:
                        rest = torch.full(values.shape[:-1], float("-inf"), device=values.device)
                    for key, value in (("topk_logp", values), ("topk_index", index.to(torch.int32)),
                                       ("rest_logp", rest), ("target_logp", target)):
                        rows[key].append(value.cpu())
                atomic_save_tensors({key: torch.stack(v) for key, v in rows.items()},
                                    out / f"batch_{i:05d}.safetensors")
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    # the windows themselves travel with the cache, so the pruned pass needs no tokenizer run
    atomic_save_tensors({"input_ids": windows}, out / "windows.safetensors")
    tokens = nwin * (windows.shape[1] - 1)
    meta = {
        "format": CACHE_FORMAT, "batches": math.ceil(nwin / batch_size), "batch_size": batch_size,
        "windows": nwin, "seqlen": seqlen, "bos": bos, "topk": k, "vocab": vocab, "exact": k >= (vocab or 0),
        "tokens": tokens, "windows_sha256": sha256_ids(windows), "dropped_tokens": dropped, "source": prov,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "nll": nll / tokens,
        "perplexity": math.exp(nll / tokens) if nll / tokens < 700 else math.inf,
        "model": getattr(getattr(model, "config", None), "_name_or_path", ""),
    }
    atomic_write_json(out / "meta.json", meta, indent=1)
    return meta


def token_divergences(p_top: torch.Tensor, p_index: torch.Tensor, p_rest: torch.Tensor, q_logp: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (JSD, KL(P||Q), Q's tail log-mass) from P's compact form and Q's full log-probs.

    P is given by its top-k log-probs (+ ids) and the log of its remaining mass; Q's mass outside P's
    top-k is lumped into one bucket as well, so the result is exact when P's tail is empty and a lower
    bound otherwise. All arithmetic in fp64 for sums of many tiny terms.
    """
    p_top = p_top.double()
    q_top = q_logp.gather(-1, p_index.long()).double()
    k = p_index.shape[-1]
    if k < q_logp.shape[-1]:
        q_rest = q_logp.scatter(-1, p_index.long(), float("-inf")).logsumexp(-1).double()
    else:
        q_rest = torch.full(p_top.shape[:-1], float("-inf"), dtype=torch.float64)
    lp = torch.cat([p_top, p_rest.double()[..., None]], dim=-1)
    lq = torch.cat([q_top, q_rest[..., None]], dim=-1)
    lm = torch.logaddexp(lp, lq) - LN2
    p, q = lp.exp(), lq.exp()
    # 0 * log 0 = 0: where a probability is 0 its term vanishes
    term_p = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p))
    term_q = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q))
    jsd = (0.5 * (term_p.sum(-1) + term_q.sum(-1))).clamp(0.0, LN2)
    kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1).clamp_min(0.0)
    return jsd, kl, q_rest


def _summary(values: torch.Tensor, bins: int) -> tuple[float, float, float, dict[str, list[float]]]:
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=LN2)
    edges = torch.linspace(0.0, LN2, bins + 1)
    return (float(values.mean()), float(values.median()), float(torch.quantile(values.float(), 0.95)),
            {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]})


def divergence(
    model: Any,
    reference: ReferenceCache | str | Path,
    *,
    tokenizer: Any = None,
    bins: int = HIST_BINS,
    progress: bool | None = None,
) -> DivergenceResult:
    """Compare `model` (e.g. the pruned one) against a dense cache written by `cache_reference`.

    When `tokenizer` is given it must be the reference's tokenizer (same vocabulary and special tokens).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    ref = reference if isinstance(reference, ReferenceCache) else ReferenceCache.open(reference)
    meta = ref.meta
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else None
    if fingerprint is not None and meta.get("tokenizer_sha256") and fingerprint != meta["tokenizer_sha256"]:
        raise PrunekitError("the models have different tokenizers (vocabulary or special tokens differ); "
                            "accepted: a pruned model and the dense model it came from")
    width = _logits_width(model)
    if width is not None and meta.get("vocab") is not None and width != meta["vocab"]:
        raise PrunekitError(f"the models have different vocabularies ({width} vs {meta['vocab']} logits); "
                            "accepted: a pruned model and the dense model it came from")
    windows = load_file(ref.folder / "windows.safetensors")["input_ids"]
    if sha256_ids(windows) != meta["windows_sha256"]:
        raise PrunekitError(f"the cache in {ref.folder} is damaged (windows hash differs)")
    device = next(model.parameters()).device
    bs = int(meta["batch_size"])
    jsd_all, kl_sum, agree, tail_sum, nll = [], 0.0, 0, 0.0, 0.0
    show = sys.stderr.isatty() if progress is None else progress
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=ref.batches, desc="divergence", unit="batch", file=sys.stderr,
                                          disable=not show) as bar:
            for i in range(ref.batches):
                cached = ref.batch(i)
                batch = windows[i * bs:(i + 1) * bs].to(device)
                for r, q in enumerate(_forward_logprobs(model, batch)):
                    if q.shape[-1] != meta["vocab"]:
                        raise PrunekitError(f"the models have different vocabularies ({q.shape[-1]} vs "
                                            f"{meta['vocab']} logits)")
                    q = q.cpu()
                    jsd, kl, _ = token_divergences(cached["topk_logp"][r], cached["topk_index"][r],
                                                   cached["rest_logp"][r], q)
                    jsd_all.append(jsd.float())
                    kl_sum += float(kl.sum())
                    agree += int((q.argmax(-1) == cached["topk_index"][r, :, 0].long()).sum())
                    nll -= float(q.gather(-1, batch[r, 1:, None].cpu()).double().sum())
                tail_sum += float(cached["rest_logp"].double().exp().sum())
                bar.update(1)
    finally:
        model.train(was_training)
    per_token = torch.cat(jsd_all)
    n = int(per_token.numel())
    mean, median, p95, hist = _summary(per_token, bins)
    exact = bool(meta["exact"])
    protocol = (f"same windows as the perplexity protocol ({meta['windows']} x {meta['seqlen']}, bos={meta['bos']}); "
                f"per predicted token: JSD and KL(dense||model) in nats between next-token distributions, "
                + ("exact (full dense log-probs cached)" if exact else
                   f"dense top-{meta['topk']} exact, tails lumped into one bucket (a lower bound)")
                + "; top-1 agreement = equal arg-max")
    return DivergenceResult(
        jsd_mean=mean, jsd_median=median, jsd_p95=p95, kl_mean=kl_sum / n, top1_agreement=agree / n, tokens=n,
        windows=int(meta["windows"]), seqlen=int(meta["seqlen"]), bos=bool(meta["bos"]), topk=int(meta["topk"]),
        exact=exact, tail_mass_mean=tail_sum / n,
        perplexity=math.exp(nll / n) if nll / n < 700 else math.inf,
        reference_perplexity=float(meta["perplexity"]), histogram=hist, source=meta["source"],
        reference={"model": meta.get("model"), "tokenizer_sha256": meta.get("tokenizer_sha256")},
        seconds=time.perf_counter() - t0, protocol=protocol,
    )


def compare(
    dense: Any,
    model: Any,
    tokenizer: Any,
    source: str | list[str] | TextSource | TokenSource,
    *,
    seqlen: int,
    batch_size: int = 8,
    bos: bool = False,
    split: str = "test",
    max_windows: int | None = None,
    topk: int = DEFAULT_TOPK,
    cache_dir: str | Path | None = None,
) -> DivergenceResult:
    """Both models in memory: cache the dense pass (in a temporary folder unless given), then compare."""
    with tempfile.TemporaryDirectory(prefix="prunekit-dense-") as tmp:
        ref = cache_reference(dense, tokenizer, source, cache_dir or Path(tmp) / "cache", seqlen=seqlen,
                              batch_size=batch_size, bos=bos, split=split, max_windows=max_windows, topk=topk)
        return divergence(model, ref, tokenizer=tokenizer)


def exact_divergence(dense: Any, model: Any, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token JSD and KL from both models' full distributions in memory: the reference for tests."""
    with torch.inference_mode():
        lp = torch.stack(list(_forward_logprobs(dense, windows))).double()
        lq = torch.stack(list(_forward_logprobs(model, windows))).double()
    lm = torch.logaddexp(lp, lq) - LN2
    jsd = 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return jsd, kl
