"""Jensen–Shannon divergence to the dense model: properties, streamed == exact, CLI and bad input."""

from __future__ import annotations

import copy
import importlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.api import prune
from prunekit.evaluation.divergence import (
    ReferenceCache,
    cache_reference,
    compare,
    divergence,
    exact_divergence,
    token_divergences,
)
from prunekit.evaluation.perplexity import perplexity
from tiny import WORDS, assert_one_line_error, build, make_tokenizer, run


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.choice(WORDS) for _ in range(150)) for _ in range(8)]


@pytest.fixture(scope="module")
def pair(tok):
    dense = build("llama", vocab=len(tok), max_positions=128)
    with torch.no_grad():  # peaked next-token distributions, like a trained LM (a random one is near uniform)
        dense.lm_head.weight.mul_(40)
    pruned = copy.deepcopy(dense)
    prune(pruned, method="magnitude", sparsity=0.6, progress=False)
    return dense, pruned


def test_jsd_of_model_with_itself_is_zero(tok, docs, pair):
    dense, _ = pair
    result = compare(dense, dense, tok, docs, seqlen=32, batch_size=3, topk=16)
    assert result.jsd_mean < 1e-6 and result.jsd_p95 < 1e-6 and result.kl_mean < 1e-6
    assert result.top1_agreement == 1.0
    assert math.isclose(result.perplexity, result.reference_perplexity, rel_tol=1e-6)


def test_streamed_equals_exact_and_perplexity_protocol(tok, docs, pair, tmp_path):
    dense, pruned = pair
    vocab = len(tok)
    exact = compare(dense, pruned, tok, docs, seqlen=32, batch_size=3, topk=vocab, cache_dir=tmp_path / "c")
    assert exact.exact and exact.tail_mass_mean == 0.0
    ref = ReferenceCache.open(tmp_path / "c")
    assert ref.meta["exact"] and ref.meta["tokens"] == exact.tokens
    ids = load_file(tmp_path / "c" / "windows.safetensors")["input_ids"]
    jsd, kl = exact_divergence(dense, pruned, ids)
    assert exact.tokens == jsd.numel() == ids.shape[0] * (ids.shape[1] - 1)
    assert exact.jsd_mean == pytest.approx(float(jsd.mean()), rel=1e-5, abs=1e-7)
    assert exact.kl_mean == pytest.approx(float(kl.mean()), rel=1e-5, abs=1e-7)
    assert 0 < exact.jsd_mean <= math.log(2)
    # top-k cache: a lower bound, close to the exact value (the tail is lumped into one bucket)
    approx = compare(dense, pruned, tok, docs, seqlen=32, batch_size=3, topk=32)
    assert not approx.exact and 0 < approx.tail_mass_mean < 1
    assert approx.jsd_mean <= exact.jsd_mean + 1e-9
    assert approx.jsd_mean == pytest.approx(exact.jsd_mean, rel=0.15)
    assert approx.top1_agreement == exact.top1_agreement
    # same windows and numbers as the perplexity protocol
    ppl = perplexity(pruned, tok, docs, seqlen=32)
    dense_ppl = perplexity(dense, tok, docs, seqlen=32)
    assert exact.perplexity == pytest.approx(ppl.perplexity, rel=1e-5)
    assert exact.reference_perplexity == pytest.approx(dense_ppl.perplexity, rel=1e-5)
    assert exact.windows == ppl.windows and exact.tokens == ppl.tokens
    assert sum(exact.histogram["counts"]) == exact.tokens


def naive_jsd_kl(p: list[float], q: list[float]) -> tuple[float, float]:
    """JSD(P, Q) and KL(P || Q) in nats from their definitions, in Python floats (float64); 0 · log 0 = 0."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x: list[float], y: list[float]) -> float:
        return sum(a * math.log(a / b) for a, b in zip(x, y, strict=True) if a > 0)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m), kl(p, q)


def test_token_divergences_match_float64_definitions():
    """Per-token JSD and KL against the definitions on a 12-token vocabulary: exact with the full distribution,
    and on the coarsened distributions {P's top-k tokens, one bucket for the rest} with a top-k cache."""
    generator = torch.Generator().manual_seed(0)
    vocab, tokens = 12, 30
    p_logits = torch.randn(tokens, vocab, generator=generator, dtype=torch.float64) * 3
    p_logits[:5, :4] = float("-inf")  # tokens P gives probability 0
    lp = torch.log_softmax(p_logits, -1)
    lq = torch.log_softmax(torch.randn(tokens, vocab, generator=generator, dtype=torch.float64) * 3, -1)
    for k in (vocab, 4):
        top, index = lp.topk(k, dim=-1)
        rest = (lp.scatter(-1, index, float("-inf")).logsumexp(-1) if k < vocab
                else torch.full((tokens,), float("-inf"), dtype=torch.float64))
        jsd, kl, _ = token_divergences(top, index.to(torch.int32), rest, lq)
        for t in range(tokens):
            chosen = index[t].tolist()
            others = [j for j in range(vocab) if j not in chosen]
            p = [math.exp(lp[t, j]) for j in chosen] + [sum(math.exp(lp[t, j]) for j in others)]
            q = [math.exp(lq[t, j]) for j in chosen] + [sum(math.exp(lq[t, j]) for j in others)]
            want_jsd, want_kl = naive_jsd_kl(p, q)
            assert float(jsd[t]) == pytest.approx(want_jsd, rel=1e-9, abs=1e-12), (k, t)
            assert float(kl[t]) == pytest.approx(want_kl, rel=1e-9, abs=1e-12), (k, t)
    # identical distributions give 0, disjoint supports ln 2
    full = torch.arange(vocab).expand(2, vocab)
    same, _, _ = token_divergences(lq[:2], full, torch.full((2,), float("-inf")), lq[:2])
    assert torch.allclose(same, torch.zeros(2, dtype=torch.float64), atol=1e-15)
    idx = torch.tensor([[0, 1]])
    p = torch.log(torch.tensor([[1.0, 0.0]]))
    q = torch.log(torch.tensor([[0.0, 1.0]]))
    j, _, _ = token_divergences(p, idx, torch.tensor([float("-inf")]), q)
    assert float(j) == pytest.approx(math.log(2), rel=1e-12)


def test_interrupted_cache_leaves_nothing(tok, docs, pair, tmp_path, monkeypatch):
    """The batches, then the windows, then meta.json; a failure before the end leaves no cache and no staging."""
    div = importlib.import_module("prunekit.evaluation.divergence")  # the package exports a function of that name
    written, real = [], div.atomic_save_tensors

    def fail_on_windows(tensors, path, **kwargs):
        written.append(Path(path).name)
        if Path(path).name == "windows.safetensors":
            raise OSError("disk full")
        return real(tensors, path, **kwargs)

    monkeypatch.setattr(div, "atomic_save_tensors", fail_on_windows)
    with pytest.raises(OSError, match="disk full"):
        cache_reference(pair[0], tok, docs, tmp_path / "c", seqlen=32, batch_size=4, topk=8, max_windows=5)
    assert written == ["batch_00000.safetensors", "batch_00001.safetensors", "windows.safetensors"]
    assert list(tmp_path.iterdir()) == []


def test_cache_is_compact_and_checked(tok, docs, pair, tmp_path):
    dense, pruned = pair
    ref = cache_reference(dense, tok, docs, tmp_path / "c", seqlen=32, batch_size=4, topk=8, max_windows=5)
    assert ref.meta["windows"] == 5 and ref.batches == 2
    assert ref.batch(0)["topk_logp"].shape == (4, 31, 8)
    other = make_tokenizer()
    other.add_tokens(["zzzz"])
    with pytest.raises(Exception, match="different tokenizers"):
        divergence(pruned, ref, tokenizer=other)
    wide = build("llama", vocab=len(tok) + 8, max_positions=128)
    with pytest.raises(Exception, match="different vocabularies"):
        divergence(wide, ref)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not a dense log-prob cache"):
        cache_reference(dense, tok, docs, precious, seqlen=32)
    assert (precious / "notes.txt").exists()


def test_cli_jsd(capsys, tmp_path, tok, pair):
    dense, pruned = pair
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rng = random.Random(5)
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(6)))
    code, out, err = run(capsys, "eval", tmp_path / "pruned", "--reference", tmp_path / "dense", "--jsd", text,
                         "--seqlen", "32", "--json", "--save-json", tmp_path / "eval.json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert 0 < summary["divergence"]["jsd_mean"] <= math.log(2)
    assert json.loads((tmp_path / "eval.json").read_text())["divergence"]["tokens"] == summary["divergence"]["tokens"]
    # bad input: one line, exit 2
    code, _, err = run(capsys, "eval", tmp_path / "pruned", "--jsd", text, "--seqlen", "32")
    assert_one_line_error(code, err, "--reference")
    short = tmp_path / "short.txt"
    short.write_text("the of and")
    code, _, err = run(capsys, "eval", tmp_path / "pruned", "--reference", tmp_path / "dense", "--jsd", short,
                       "--seqlen", "32")
    assert_one_line_error(code, err, "shorter than one window")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "eval", tmp_path / "pruned", "--reference", tmp_path / "dense", "--jsd", empty,
                       "--seqlen", "32")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ")
    other = make_tokenizer()
    other.add_tokens(["zzzz", "yyyy"])
    wide = build("llama", vocab=len(other), max_positions=128)
    wide.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    code, _, err = run(capsys, "eval", tmp_path / "other", "--reference", tmp_path / "dense", "--jsd", text,
                       "--seqlen", "32")
    assert_one_line_error(code, err, "different")


@pytest.mark.real_model
def test_topk_cache_close_to_exact_on_real_model(smollm2, sotu):
    """The compact cache (top-1024 + lumped tail) against the full distributions on SmolLM2, 1 x 128 tokens."""
    dense, tokenizer = smollm2
    pruned = copy.deepcopy(dense)
    prune(pruned, method="magnitude", sparsity=0.3, progress=False)
    source = str(sotu / "test.txt")
    approx = compare(dense, pruned, tokenizer, source, seqlen=128, max_windows=1)
    exact = compare(dense, pruned, tokenizer, source, seqlen=128, max_windows=1, topk=10**6)
    assert exact.exact and not approx.exact and approx.topk == 1024
    assert approx.jsd_mean <= exact.jsd_mean + 1e-9  # a lower bound
    assert approx.jsd_mean == pytest.approx(exact.jsd_mean, rel=0.08)
    assert approx.kl_mean <= exact.kl_mean + 1e-9
    assert approx.top1_agreement == exact.top1_agreement
    assert approx.perplexity == pytest.approx(exact.perplexity, rel=1e-6)
