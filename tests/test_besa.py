"""BESA on a tiny llama block: exact block sparsity, Wanda-ranked rows, the estimator, no side effects."""

from __future__ import annotations

import pytest
import torch

from prunekit.adapters import get_adapter
from prunekit.engine.capture import capture_block_calls, capture_block_inputs
from prunekit.errors import PrunekitError
from prunekit.methods import build_method
from prunekit.methods.besa import BESAConfig, _RowSparsity, besa_prune_block, exact_row_counts
from prunekit.pruning import SparsityTarget
from tiny import build, random_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # thousands of tiny ops: threads only wait


def tiny_block(n=8, seqlen=16):
    model = build("llama")
    adapter = get_adapter(model)
    blocks = adapter.blocks()
    ids = random_ids(n=n, seqlen=seqlen)
    calls = capture_block_calls(model, blocks, seqlen, "cpu")
    activations = capture_block_inputs(model, blocks, ids, 4, "cpu")
    block, call = blocks[0], calls[0]

    def forward(hidden):
        out = block(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    linears = {name: module for _g, modules in adapter.block_linears(block) for name, module in modules.items()}
    batches = [activations[i : i + 2] for i in range(0, n, 2)]
    return block, linears, forward, batches


def input_norms(linears, forward, batches):
    sums = {name: 0 for name in linears}
    handles = [m.register_forward_pre_hook(lambda _m, a, name=name: sums.__setitem__(
        name, sums[name] + a[0].reshape(-1, a[0].shape[-1]).double().square().sum(0))) for name, m in linears.items()]
    with torch.no_grad():
        for batch in batches:
            forward(batch)
    for h in handles:
        h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def block_error(linears, masks, forward, batches):
    saved = {n: m.weight.detach().clone() for n, m in linears.items()}
    with torch.no_grad():
        dense = [forward(b) for b in batches]
        for name, module in linears.items():
            module.weight.masked_fill_(masks[name], 0.0)
        error = sum(float((forward(b) - d).square().sum()) for b, d in zip(batches, dense, strict=True))
        for name, module in linears.items():
            module.weight.copy_(saved[name])
    return error


def test_block_is_pruned_exactly_along_wanda_ranks_without_side_effects():
    block, linears, forward, batches = tiny_block()
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    targets = {name: SparsityTarget(0.5) for name in linears}
    lines: list[str] = []
    masks = besa_prune_block(linears, forward, batches, None, targets, BESAConfig(epochs=2), progress=lines.append)
    assert len(lines) == 2 and "besa epoch 2/2" in lines[-1]
    total = sum(m.weight.numel() for m in linears.values())
    assert sum(int(mask.sum()) for mask in masks.values()) == round(0.5 * total)
    norms = input_norms(linears, forward, batches)
    for name, mask in masks.items():
        scores = linears[name].weight.detach().abs().double() * norms[name]
        for row in range(mask.shape[0]):  # a row prunes a prefix of its Wanda order
            pruned, kept = scores[row][mask[row]], scores[row][~mask[row]]
            if len(pruned) and len(kept):
                assert pruned.max() <= kept.min(), (name, row)
    assert len({round(float(m.float().mean()), 3) for m in masks.values()}) > 1  # the allocation is learned
    for name, param in block.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None and param.requires_grad == flags[name]
    assert all(type(m).__name__ == "Linear" and not hasattr(m, "parametrizations") for m in linears.values())


def test_learned_masks_reconstruct_better_than_uniform_wanda():
    _block, linears, forward, batches = tiny_block(n=16)
    targets = {name: SparsityTarget(0.6) for name in linears}
    masks = besa_prune_block(linears, forward, batches, None, targets, BESAConfig(epochs=8))
    norms = input_norms(linears, forward, batches)
    from prunekit.pruning.masks import unstructured_row_mask

    wanda = {name: unstructured_row_mask(m.weight.detach().abs() * norms[name].float(), 0.6)
             for name, m in linears.items()}
    assert block_error(linears, masks, forward, batches) < block_error(linears, wanda, forward, batches)


def test_straight_through_mask_equals_naive():
    g = torch.Generator().manual_seed(0)
    weight, norms = torch.randn(3, 10, generator=g), torch.rand(10, generator=g) + 0.1
    candidates = torch.linspace(1.0, 0.0, 5)  # 1, .75, .5, .25, 0
    learner = _RowSparsity(weight, norms, candidates)
    with torch.no_grad():
        learner.logits.copy_(torch.randn(3, 5, generator=g))
    probe = torch.randn(3, 10, generator=g)
    (learner.keep_mask() * probe).sum().backward()
    got_value, got_grad = learner.keep_mask().detach(), learner.logits.grad.clone()

    logits = learner.logits.detach().double().clone().requires_grad_(True)
    probs = torch.softmax(torch.sigmoid(logits), dim=-1)
    plain = probs.detach()
    soft = torch.zeros(3, 10, dtype=torch.float64)
    hard = torch.zeros(3, 10)
    scores = weight.abs() * norms
    for i in range(3):
        ranking = sorted(range(10), key=lambda j: (float(scores[i, j]), j))
        count = int(sum(float(plain[i, c]) * float(candidates[c]) for c in range(5)) * 10 + 1e-6)
        for rank, j in enumerate(ranking):
            pruned_prob = sum(probs[i, c] for c in range(5) if rank < int(float(candidates[c]) * 10 + 1e-6))
            soft[i, j] = 1 - pruned_prob
            hard[i, j] = float(rank >= count)
    (soft * probe.double()).sum().backward()
    assert torch.equal(got_value, hard)
    assert torch.allclose(got_grad.double(), logits.grad, atol=1e-6)


def test_exact_row_counts():
    g = torch.Generator().manual_seed(1)
    sparsities = [torch.rand(7, generator=g), torch.rand(5, generator=g) * 0.3]
    widths = [20, 9]
    for total in (0, 1, 50, 101, 185):
        counts = exact_row_counts(sparsities, widths, total)
        assert sum(int(c.sum()) for c in counts) == total
        assert all(int(c.min()) >= 0 and int(c.max()) <= w for c, w in zip(counts, widths, strict=True))


def test_nm_and_per_layer_calls_are_refused():
    _block, linears, forward, batches = tiny_block(n=2)
    with pytest.raises(PrunekitError, match="besa learns unstructured"):
        besa_prune_block(linears, forward, batches, None, {n: SparsityTarget(0.5, 2, 4) for n in linears})
    with pytest.raises(PrunekitError, match="block hook"):
        build_method("besa").prune_layer(torch.zeros(2, 4), None, SparsityTarget(0.5))
    with pytest.raises(PrunekitError, match="candidate_step"):
        build_method("besa", {"candidate_step": "tiny"})
