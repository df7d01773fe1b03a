"""The pinned perplexity protocol against an independent window-by-window computation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from safetensors.torch import save_file

from prunekit.errors import PrunekitError
from prunekit.evaluation import PerplexityResult, perplexity

WORD_TEXT = (
    "the of and to a in that is was he for it with as his on be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two may then"
)


def synthetic_documents(n: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = WORD_TEXT.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))).capitalize() + "." for _ in range(n)]


def make_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(tokenizer, max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def reference_perplexity(model, stream: torch.Tensor, seqlen: int, bos_id: int | None = None) -> tuple[float, int]:
    """Independent plain version: one window at a time, transformers' own loss, weighted by tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(stream.numel() // seqlen):
            w = stream[i * seqlen : (i + 1) * seqlen].unsqueeze(0)
            if bos_id is not None:
                w = torch.cat([torch.tensor([[bos_id]]), w], dim=1)
            n = w.shape[1] - 1
            nll += model(input_ids=w, labels=w).loss.item() * n
            count += n
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return synthetic_documents()


@pytest.fixture(scope="module")
def tok(docs):
    return make_tokenizer(docs)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def stream(tok, docs) -> torch.Tensor:
    return torch.tensor(tok("\n\n".join(docs), add_special_tokens=False)["input_ids"])


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_matches_independent_computation(model, tok, docs, stream):
    seqlen = 64
    res = perplexity(model, tok, docs, seqlen=seqlen, batch_size=3)
    ref, count = reference_perplexity(model, stream, seqlen)
    assert isinstance(res, PerplexityResult)
    assert res.windows == stream.numel() // seqlen
    assert res.tokens == count == res.windows * (seqlen - 1)
    assert res.dropped_tokens == stream.numel() - res.windows * seqlen
    assert abs(res.perplexity - ref) / ref < 1e-4
    assert abs(res.nll - math.log(ref)) < 1e-4
    assert res.bos is False and "no BOS" in res.protocol and "add_special_tokens=False" in res.protocol


def test_bos_prepended(model, tok, docs, stream):
    seqlen = 64
    plain = perplexity(model, tok, docs, seqlen=seqlen)
    res = perplexity(model, tok, docs, seqlen=seqlen, bos=True)
    ref, count = reference_perplexity(model, stream, seqlen, bos_id=tok.bos_token_id)
    assert res.bos is True and res.windows == plain.windows
    assert res.tokens == count == res.windows * seqlen == plain.tokens + plain.windows
    assert abs(res.perplexity - ref) / ref < 1e-4
    assert f"BOS id {tok.bos_token_id} prepended" in res.protocol


def test_batch_size_does_not_change_result(model, tok, docs):
    a = perplexity(model, tok, docs, seqlen=48, batch_size=1)
    b = perplexity(model, tok, docs, seqlen=48, batch_size=16)
    assert abs(a.perplexity - b.perplexity) / a.perplexity < 1e-5


def test_max_windows_and_to_dict(model, tok, docs, stream):
    res = perplexity(model, tok, docs, seqlen=32, max_windows=2)
    ref, _ = reference_perplexity(model, stream[: 2 * 32], 32)
    assert res.windows == 2 and abs(res.perplexity - ref) / ref < 1e-4
    d = res.to_dict()
    assert d["windows"] == 2 and d["seqlen"] == 32 and d["source"]["kind"] == "documents"
    assert set(d) >= {"perplexity", "nll", "tokens", "windows", "seqlen", "bos", "source", "seconds"}


def test_txt_source_and_safetensors(tmp_path, model, tok, docs, stream):
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    from_file = perplexity(model, tok, str(path), seqlen=64)
    from_list = perplexity(model, tok, docs, seqlen=64)
    assert from_file.perplexity == pytest.approx(from_list.perplexity, rel=1e-6)
    assert from_file.source["kind"] == "text" and len(from_file.source["sha256"]) == 64

    n = stream.numel() // 64
    ids = stream[: n * 64].view(n, 64).to(torch.int32)
    st = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids}, str(st))
    from_ids = perplexity(model, tok, str(st), seqlen=64)
    assert from_ids.windows == n
    assert from_ids.perplexity == pytest.approx(from_list.perplexity, rel=1e-6)
    with pytest.raises(PrunekitError) as e:
        perplexity(model, tok, str(st), seqlen=32)
    assert "seqlen 64, not the requested 32" in one_line_error(e)


def test_real_text(embedded_sotu):
    text = embedded_sotu.read_text(encoding="utf-8")
    tok = make_tokenizer([text[:200_000]])
    model = tiny_llama(tok)
    res = perplexity(model, tok, str(embedded_sotu), seqlen=128, max_windows=4)
    assert res.windows == 4 and res.tokens == 4 * 127
    assert math.isfinite(res.perplexity) and res.perplexity > 1
    assert res.source["documents"] == 2


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seqlen": 1}, "seqlen 1"),
        ({"seqlen": 300}, "seqlen 300 exceeds the model's context of 256"),
        ({"seqlen": 256, "bos": True}, "(+1 for BOS) exceeds"),
        ({"seqlen": 16, "batch_size": 0}, "batch_size 0"),
        ({"seqlen": 16, "max_windows": 0}, "max_windows 0"),
    ],
)
def test_argument_errors(model, tok, docs, kwargs, needle):
    with pytest.raises(PrunekitError) as e:
        perplexity(model, tok, docs, **kwargs)
    assert needle in one_line_error(e)


def test_source_errors(model, tok):
    with pytest.raises(PrunekitError) as e:
        perplexity(model, tok, ["too short"], seqlen=64)
    assert "shorter than one window of seqlen 64" in one_line_error(e)
    with pytest.raises(PrunekitError) as e:
        perplexity(model, tok, "self", seqlen=64)
    assert "calibration only" in one_line_error(e)


def test_bos_without_bos_token(model, tok, docs):
    from transformers import PreTrainedTokenizerFast

    nobos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    with pytest.raises(PrunekitError) as e:
        perplexity(model, nobos, docs, seqlen=32, bos=True)
    assert "no BOS token" in one_line_error(e)
