"""Jensen–Shannon divergence to the dense model: properties, streamed == exact, CLI and bad input."""

from __future__ import annotations

import copy
import json
import math
import random

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


def test_token_divergences_symmetric_and_bounded():
    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(50, 20) * 3, -1)
    b = torch.log_softmax(torch.randn(50, 20) * 3, -1)
    full = torch.arange(20).expand(50, 20)
    rest = torch.full((50,), float("-inf"))
    jab, kab, _ = token_divergences(a.gather(-1, full), full, rest, b)
    jba, _, _ = token_divergences(b.gather(-1, full), full, rest, a)
    assert torch.allclose(jab, jba, atol=1e-10)
    assert (jab >= 0).all() and (jab <= math.log(2) + 1e-12).all() and (kab >= 0).all()
    # disjoint supports reach ln 2
    p = torch.log(torch.tensor([[1.0, 0.0]]).clamp_min(0))
    q = torch.log(torch.tensor([[0.0, 1.0]]).clamp_min(0))
    idx = torch.tensor([[0, 1]])
    j, _, _ = token_divergences(p.gather(-1, idx), idx, torch.tensor([float("-inf")]), q)
    assert float(j) == pytest.approx(math.log(2))


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
