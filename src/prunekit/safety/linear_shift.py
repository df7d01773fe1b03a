"""Does Wanda pruning act as a regulariser under domain shift? The paper's linear-model experiment, re-built.

Hasan et al. argue that pruning helps jailbreak resistance the way regularisation helps under distribution
shift: a jailbreak template is a shift of the input away from the aligned distribution. Their toy check uses
linear models; this module sets up an equivalent, fully specified one:

* d features with heterogeneous scales (x_j ~ N(0, s_j²), s_j log-uniform in [1/2, 2], so that Wanda's input
  norms matter); only the first k ("core") features carry signal: labels y ~ softmax(β·W*x) over C classes
  with W* zero outside the core features;
* a multinomial logistic regression (with bias, light L2) trained on n source samples — few enough that it
  fits weights to the noise features too;
* Wanda: score_ij = |W_ij|·||X_j||₂ over the training inputs, the lowest fraction of each output row set to 0
  (no retraining, as for LLMs);
* target = covariate shift: the noise features get a new mean (N(0, μ²) per feature) and a `shift_scale`
  times larger spread; the core features and P(y | x) are unchanged. A source test set measures the cost.
* every seed draws a new W*, scales and data; pruned vs dense accuracy is compared per seed (paired):
  mean difference with a t interval, Wilcoxon signed-rank and sign tests.

Reproduce: ``python -m prunekit.safety.linear_shift --out benchmarks/results/linear_shift.json`` (CPU, ~1 min).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from prunekit.files import atomic_write_json
from prunekit.pruning.masks import unstructured_row_mask
from prunekit.safety.stats import paired_difference


@dataclass
class LinearShiftConfig:
    """The whole experiment; stored with its result."""

    seeds: int = 200
    features: int = 100
    core: int = 10
    classes: int = 4
    train: int = 200
    test: int = 4000
    beta: float = 1.5  # signal strength of the labelling model
    weight_decay: float = 1e-3
    steps: int = 200  # L-BFGS iterations
    shift_mean: float = 1.0  # std of the new per-feature means of the noise features
    shift_scale: float = 3.0  # spread multiplier of the noise features in the target domain
    sparsities: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.7, 0.9])


def _domain(n: int, scales: torch.Tensor, core: int, w_star: torch.Tensor, beta: float, generator: torch.Generator,
            mean: torch.Tensor | None = None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, scales.numel(), generator=generator, dtype=torch.float64) * scales
    if mean is not None:
        x[:, core:] = x[:, core:] * scale + mean
    logits = beta * x @ w_star.T
    y = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    return x, y


def train_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float,
                   steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic)."""
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def wanda_prune(w: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the lowest |W_ij|·||X_j|| of each output row: Wanda's comparison group and per-row count."""
    return w.masked_fill(unstructured_row_mask(w.abs() * x.norm(dim=0), sparsity), 0.0)


def _accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w.T + b).argmax(-1) == y).double().mean())


def run_seed(config: LinearShiftConfig, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    d, k = config.features, config.core
    scales = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g))
    w_star = torch.zeros(config.classes, d, dtype=torch.float64)
    w_star[:, :k] = torch.randn(config.classes, k, generator=g, dtype=torch.float64) / scales[:k]
    x_train, y_train = _domain(config.train, scales, k, w_star, config.beta, g)
    x_src, y_src = _domain(config.test, scales, k, w_star, config.beta, g)
    mean = torch.randn(d - k, generator=g, dtype=torch.float64) * config.shift_mean * scales[k:]
    x_tgt, y_tgt = _domain(config.test, scales, k, w_star, config.beta, g, mean=mean, scale=config.shift_scale)
    w, b = train_logistic(x_train, y_train, config.classes, config.weight_decay, config.steps)
    zero = torch.zeros_like(b)
    row: dict[str, Any] = {"seed": seed, "dense": {"source": _accuracy(w, b, x_src, y_src),
                                                   "target": _accuracy(w, b, x_tgt, y_tgt),
                                                   "train": _accuracy(w, b, x_train, y_train)},
                           # the labelling model itself: what a model using only the core features can reach
                           "oracle": {"source": _accuracy(config.beta * w_star, zero, x_src, y_src),
                                      "target": _accuracy(config.beta * w_star, zero, x_tgt, y_tgt)}}
    for s in config.sparsities:
        p = wanda_prune(w, x_train, s)
        row[f"{s:g}"] = {"source": _accuracy(p, b, x_src, y_src), "target": _accuracy(p, b, x_tgt, y_tgt),
                         "core_weights_kept": float((p[:, :k] != 0).double().mean())}
    return row


def _compare(dense: list[float], pruned: list[float]) -> dict[str, Any]:
    paired = paired_difference(dense, pruned)
    better = sum(p > q for q, p in zip(dense, pruned, strict=True))
    worse = sum(p < q for q, p in zip(dense, pruned, strict=True))
    sign_p = float(stats.binomtest(better, better + worse, 0.5).pvalue) if better + worse else 1.0
    return {"dense_mean": paired["mean_before"], "pruned_mean": paired["mean_after"],
            "difference": paired["mean_difference"], "ci95": paired["ci95"], "p_value_t": paired["t_p_value"],
            "p_value_wilcoxon": paired["wilcoxon_p_value"], "seeds_better": better, "seeds_worse": worse,
            "p_value_sign": sign_p}


def run_experiment(config: LinearShiftConfig) -> dict[str, Any]:
    """All seeds; per sparsity the paired pruned-vs-dense comparison on the source and the shifted target."""
    started = time.perf_counter()
    rows = [run_seed(config, seed) for seed in range(config.seeds)]
    results = []
    for s in config.sparsities:
        key = f"{s:g}"
        results.append({
            "sparsity": s, "seeds": len(rows),
            "source": _compare([r["dense"]["source"] for r in rows], [r[key]["source"] for r in rows]),
            "target": _compare([r["dense"]["target"] for r in rows], [r[key]["target"] for r in rows]),
            # the shift-specific part: does pruning gain more on the target than on the source? (paired per seed)
            "target_gain_minus_source_gain": paired_difference(
                [r[key]["source"] - r["dense"]["source"] for r in rows],
                [r[key]["target"] - r["dense"]["target"] for r in rows]),
            "core_weights_kept": sum(r[key]["core_weights_kept"] for r in rows) / len(rows),
        })
    dense_train = sum(r["dense"]["train"] for r in rows) / len(rows)
    oracle = {d: sum(r["oracle"][d] for r in rows) / len(rows) for d in ("source", "target")}
    return {"config": asdict(config), "dense_train_accuracy": dense_train, "oracle_accuracy": oracle,
            "results": results,
            "per_seed": rows, "seconds": time.perf_counter() - started}


def format_table(result: dict[str, Any]) -> str:
    lines = ["| sparsity | source acc dense → pruned | Δ [95 % CI] | p (Wilcoxon) | target acc dense → pruned "
             "| Δ [95 % CI] | p (Wilcoxon) | seeds better/worse (target) | Δtarget − Δsource (p) |", "|---" * 9 + "|"]
    for r in result["results"]:
        cells = [f"{100 * r['sparsity']:.0f} %"]
        for domain in ("source", "target"):
            c = r[domain]
            lo, hi = c["ci95"] or (float("nan"), float("nan"))
            cells += [f"{100 * c['dense_mean']:.2f} → {100 * c['pruned_mean']:.2f}",
                      f"{100 * c['difference']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]",
                      f"{c['p_value_wilcoxon']:.2g}"]
        cells.append(f"{r['target']['seeds_better']}/{r['target']['seeds_worse']}")
        extra = r["target_gain_minus_source_gain"]
        cells.append(f"{100 * extra['mean_difference']:+.2f} ({extra['wilcoxon_p_value']:.2g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--shift-scale", type=float, default=3.0)
    parser.add_argument("--shift-mean", type=float, default=1.0)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = LinearShiftConfig(seeds=args.seeds, shift_scale=args.shift_scale, shift_mean=args.shift_mean,
                               train=args.train, weight_decay=args.weight_decay)
    result = run_experiment(config)
    print(format_table(result))
    print(f"{config.seeds} seeds, weight decay {config.weight_decay:g}, "
          f"dense train accuracy {100 * result['dense_train_accuracy']:.1f} %, labelling-model accuracy "
          f"{100 * result['oracle_accuracy']['source']:.1f} % source / {100 * result['oracle_accuracy']['target']:.1f} "
          "% target, "
          f"{result['seconds']:.0f}s")
    if args.out:
        atomic_write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
