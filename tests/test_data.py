"""Calibration data: SOURCE resolution, seeded windows, provenance, and one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from prunekit.data import (
    JOINER,
    TextSource,
    TokenSource,
    build_calibration,
    resolve_seqlen,
    resolve_source,
    tokenize_documents,
)
from prunekit.errors import PrunekitError

WORD_TEXT = (
    "the of and to a in that is was he for it with as his on be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two may then"
)


def synthetic_documents(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = WORD_TEXT.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))).capitalize() + "." for _ in range(n)]


def make_tokenizer(corpus: list[str]):
    """A byte-level BPE trained in-test: real merges, no download, deterministic."""
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


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return synthetic_documents()


@pytest.fixture(scope="module")
def tok(docs):
    return make_tokenizer(docs)


@pytest.fixture(scope="module")
def txt_file(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("txt") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- sources -------------------------------------------------------------------------------------------


def test_txt_file_documents_and_provenance(txt_file, docs):
    src = resolve_source(str(txt_file))
    assert isinstance(src, TextSource)
    assert src.documents == docs
    p = src.provenance
    assert p["kind"] == "text" and p["source"] == str(txt_file) and p["documents"] == len(docs)
    assert p["characters"] == sum(map(len, docs)) and len(p["sha256"]) == 64


def test_folder_of_txt_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nthird doc", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first doc\n  \n\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not text", encoding="utf-8")
    src = resolve_source(str(tmp_path))
    assert src.documents == ["first doc", "second file", "third doc"]
    assert src.provenance["kind"] == "text-folder"
    assert list(src.provenance["files"]) == ["a.txt", "b.txt"]


def test_empty_folder_raises(tmp_path):
    with pytest.raises(PrunekitError) as e:
        resolve_source(str(tmp_path))
    assert "no .txt files" in one_line_error(e)


def test_jsonl_default_and_named_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert resolve_source(str(path)).documents == ["alpha", "beta"]
    src = resolve_source(f"{path}:body")
    assert src.documents == ["one", "two"]
    assert src.provenance["field"] == "body" and src.provenance["kind"] == "jsonl"
    with pytest.raises(PrunekitError) as e:
        resolve_source(f"{path}:missing")
    msg = one_line_error(e)
    assert "'missing'" in msg and "body, text" in msg


def test_jsonl_non_string_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": 3}) + "\n", encoding="utf-8")
    with pytest.raises(PrunekitError) as e:
        resolve_source(str(path))
    assert "int" in one_line_error(e)


def test_unknown_source_and_suffix_and_split(tmp_path):
    with pytest.raises(PrunekitError) as e:
        resolve_source(str(tmp_path / "nope.txt"))
    assert "wikitext2" in one_line_error(e)
    odd = tmp_path / "x.csv"
    odd.write_text("a,b", encoding="utf-8")
    with pytest.raises(PrunekitError) as e:
        resolve_source(str(odd))
    assert ".csv" in one_line_error(e)
    with pytest.raises(PrunekitError) as e:
        resolve_source("wikitext2", split="dev")
    assert "'dev'" in one_line_error(e)


@pytest.mark.parametrize(
    ("name", "path", "config", "split", "load_split", "data_files"),
    [
        ("wikitext2", "wikitext", "wikitext-2-raw-v1", "train", "train", None),
        ("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", "test", None),
        ("c4", "allenai/c4", None, "train", "train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
        ("c4", "allenai/c4", None, "test", "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
        ("ptb", "ptb_text_only", "penn_treebank", "test", "test", None),
    ],
)
def test_public_datasets_use_paper_splits(monkeypatch, name, path, config, split, load_split, data_files):
    import datasets

    calls = []

    def fake_load(p, n=None, *, data_files=None, split=None):
        calls.append((p, n, data_files, split))
        field = "sentence" if p == "ptb_text_only" else "text"
        return datasets.Dataset.from_dict({field: ["a b", "", "c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = resolve_source(name, split=split)
    assert calls == [(path, config, data_files, load_split)]
    assert src.documents == ["a b", "", "c"]  # rows kept as they come (wikitext's empty lines too)
    assert src.provenance["dataset"] == path and src.provenance["split"] == load_split


def test_download_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PrunekitError) as e:
        resolve_source("wikitext2")
    msg = one_line_error(e)
    assert msg.startswith("could not download dataset wikitext2 (no network?)") and ".jsonl" in msg


def test_self_needs_a_model(tok):
    with pytest.raises(PrunekitError) as e:
        resolve_source("self")
    one_line_error(e)
    with pytest.raises(PrunekitError) as e:
        build_calibration("self", tok, nsamples=2, seqlen=8, seed=0)
    assert "model" in one_line_error(e)


# --- calibration windows --------------------------------------------------------------------------------


def test_windows_shape_offsets_and_stream(txt_file, tok, docs):
    cal = build_calibration(str(txt_file), tok, nsamples=7, seqlen=32, seed=3)
    assert cal.input_ids.shape == (7, 32) and cal.input_ids.dtype == torch.long
    stream = torch.tensor(tok(JOINER.join(docs), add_special_tokens=False)["input_ids"])
    offsets = cal.provenance["offsets"]
    assert len(offsets) == 7
    assert all(0 <= o <= stream.numel() - 32 for o in offsets)
    for row, o in zip(cal.input_ids, offsets, strict=True):
        assert torch.equal(row, stream[o : o + 32])
    p = cal.provenance
    assert (p["nsamples"], p["seqlen"], p["seed"], p["kind"]) == (7, 32, 3, "text")
    assert p["add_special_tokens"] is False and p["tokens"] == stream.numel()
    assert len(p["ids_sha256"]) == 64


def test_windows_reproducible_and_seed_dependent(txt_file, tok):
    a = build_calibration(str(txt_file), tok, nsamples=8, seqlen=16, seed=0)
    b = build_calibration(str(txt_file), tok, nsamples=8, seqlen=16, seed=0)
    c = build_calibration(str(txt_file), tok, nsamples=8, seqlen=16, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and a.provenance["offsets"] == b.provenance["offsets"]
    assert a.provenance["offsets"] != c.provenance["offsets"]
    assert not torch.equal(a.input_ids, c.input_ids)


def test_real_text_windows(embedded_sotu):
    from transformers import PreTrainedTokenizerFast

    text = embedded_sotu.read_text(encoding="utf-8")
    tok = make_tokenizer([text[:200_000]])
    assert isinstance(tok, PreTrainedTokenizerFast)
    cal = build_calibration(str(embedded_sotu), tok, nsamples=16, seqlen=128, seed=0)
    assert cal.input_ids.shape == (16, 128)
    assert cal.provenance["documents"] == 2  # the 2020 and 2021 addresses


def test_text_shorter_than_window(tmp_path, tok):
    path = tmp_path / "short.txt"
    path.write_text("just a few words", encoding="utf-8")
    n = len(tok("just a few words", add_special_tokens=False)["input_ids"])
    with pytest.raises(PrunekitError) as e:
        build_calibration(str(path), tok, nsamples=1, seqlen=64, seed=0)
    msg = one_line_error(e)
    assert f"{n} tokens" in msg and "seqlen 64" in msg


@pytest.mark.parametrize(("nsamples", "seqlen", "needle"), [(0, 16, "nsamples 0"), (4, 1, "seqlen 1")])
def test_bad_sizes(txt_file, tok, nsamples, seqlen, needle):
    with pytest.raises(PrunekitError) as e:
        build_calibration(str(txt_file), tok, nsamples=nsamples, seqlen=seqlen, seed=0)
    assert needle in one_line_error(e)


# --- safetensors ids ------------------------------------------------------------------------------------


def test_safetensors_ids_used_as_given(tmp_path, tok):
    ids = torch.randint(0, len(tok), (6, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids}, str(path))
    src = resolve_source(str(path))
    assert isinstance(src, TokenSource) and src.input_ids.dtype == torch.long
    cal = build_calibration(str(path), tok, nsamples=4, seqlen=16, seed=123)
    assert torch.equal(cal.input_ids, ids[:4].long())
    assert cal.provenance["kind"] == "token-ids" and len(cal.provenance["ids_sha256"]) == 64
    # the seed does not touch ids given as windows
    assert torch.equal(build_calibration(str(path), tok, nsamples=4, seqlen=16, seed=9).input_ids, cal.input_ids)


def test_safetensors_1d_stream_is_windowed(tmp_path, tok):
    stream = torch.arange(200) % len(tok)
    path = tmp_path / "stream.safetensors"
    save_file({"input_ids": stream}, str(path))
    cal = build_calibration(str(path), tok, nsamples=3, seqlen=10, seed=0)
    for row, o in zip(cal.input_ids, cal.provenance["offsets"], strict=True):
        assert torch.equal(row, stream[o : o + 10])


@pytest.mark.parametrize(
    ("tensors", "kwargs", "needle"),
    [
        ({"input_ids": torch.zeros(4, 16)}, {}, "dtype torch.float32"),
        ({"input_ids": torch.zeros(2, 2, 4, dtype=torch.long)}, {}, "shape [2, 2, 4]"),
        ({"tokens": torch.zeros(4, 16, dtype=torch.long)}, {}, "no 'input_ids'"),
        ({"input_ids": torch.zeros(4, 16, dtype=torch.long)}, {"seqlen": 32}, "seqlen 16, not the requested 32"),
        ({"input_ids": torch.zeros(2, 16, dtype=torch.long)}, {"nsamples": 4}, "2 rows"),
        ({"input_ids": torch.full((4, 16), 10_000, dtype=torch.long)}, {}, "id 10000"),
    ],
)
def test_safetensors_errors(tmp_path, tok, tensors, kwargs, needle):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    args = {"nsamples": 4, "seqlen": 16, "seed": 0, **kwargs}
    with pytest.raises(PrunekitError) as e:
        build_calibration(str(path), tok, **args)
    assert needle in one_line_error(e)


def test_not_a_safetensors_file(tmp_path, tok):
    path = tmp_path / "fake.safetensors"
    path.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(PrunekitError) as e:
        build_calibration(str(path), tok, nsamples=1, seqlen=4, seed=0)
    one_line_error(e)


# --- self -----------------------------------------------------------------------------------------------


def test_self_source_deterministic(tok):
    model = tiny_llama(tok)
    state = torch.random.get_rng_state()
    a = build_calibration("self", tok, nsamples=5, seqlen=24, seed=7, model=model, self_batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    b = build_calibration("self", tok, nsamples=5, seqlen=24, seed=7, model=model, self_batch_size=2)
    c = build_calibration("self", tok, nsamples=5, seqlen=24, seed=8, model=model, self_batch_size=2)
    assert a.input_ids.shape == (5, 24) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    assert not (a.input_ids[:, 1:] == tok.eos_token_id).any()  # EOS suppressed until the row is full
    p = a.provenance
    assert p["kind"] == "self" and p["seed"] == 7 and p["sampling"]["top_k"] == 50
    assert p["ids_sha256"] == b.provenance["ids_sha256"] != c.provenance["ids_sha256"]


# --- seqlen ---------------------------------------------------------------------------------------------


def test_resolve_seqlen():
    llama = SimpleNamespace(max_position_embeddings=8192)
    gpt2 = SimpleNamespace(n_positions=1024)
    assert resolve_seqlen(None, llama)[0] == 2048
    seqlen, note = resolve_seqlen(None, gpt2)
    assert seqlen == 1024 and "1024" in note and "n_positions" in note
    assert resolve_seqlen(None, SimpleNamespace(max_position_embeddings=131072))[0] == 2048
    assert resolve_seqlen(4096, llama) == (4096, "seqlen 4096 (requested)")
    assert resolve_seqlen(None, SimpleNamespace())[0] == 2048
    with pytest.raises(PrunekitError) as e:
        resolve_seqlen(9000, llama)
    assert one_line_error(e) == "seqlen 9000 exceeds the model's context of 8192"
    with pytest.raises(PrunekitError) as e:
        resolve_seqlen(1, llama)
    one_line_error(e)


def test_tokenize_documents_chunked_matches_joined_text(monkeypatch, tok, docs):
    import prunekit.data.sources as sources

    single, info = tokenize_documents(tok, docs)
    assert info["tokenization"] == "single pass"
    monkeypatch.setattr(sources, "SINGLE_PASS_MAX_CHARS", 100)
    monkeypatch.setattr(sources, "_CHUNK_CHARS", 500)
    chunked, info = tokenize_documents(tok, docs)
    assert info["tokenization"].startswith("chunked")
    # byte-level BPE never merges across the "\n\n" joiner here, so chunking changes nothing
    assert torch.equal(single, chunked)
    early, _ = tokenize_documents(tok, docs, max_tokens=50)
    assert 50 <= early.numel() < chunked.numel() and torch.equal(early, chunked[: early.numel()])
