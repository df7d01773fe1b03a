"""Where calibration and evaluation text comes from.

A SOURCE string names either text documents (a public dataset, a local .txt/.jsonl) or token ids that are
used as given (a .safetensors file), or `self`: text sampled from the model being pruned. Every resolved
source carries a provenance dict (what was read, its sha256, how much of it) so that a result can say
exactly which data produced it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError
from prunekit.memory import release_free_memory

#: Documents are joined with this before tokenization (the Wanda/SparseGPT wikitext2 convention).
JOINER = "\n\n"

#: Above this many characters the joined text is tokenized in document-aligned chunks: one call on a
#: ~1 GB string (a C4 shard) would need tens of GB inside the tokenizer. Below it (every usual eval set,
#: wikitext2 train included) the text is tokenized in exactly one call.
SINGLE_PASS_MAX_CHARS = 32_000_000
_CHUNK_CHARS = 8_000_000

#: Sampling settings for the `self` source. top_k=50 at temperature 1.0 is the transformers default for
#: sampling: it keeps the model's own distribution (no sharpening) while cutting the long tail of
#: junk tokens that pure ancestral sampling produces over thousands of steps.
SELF_TOP_K = 50
SELF_TEMPERATURE = 1.0

ACCEPTED_SOURCES = (
    "wikitext2, c4, ptb, self, a .txt file, a folder of .txt files, file.jsonl[:field], "
    "or a .safetensors file with input_ids"
)
ACCEPTED_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class _Dataset:
    path: str
    name: str | None
    field: str
    # our split name -> (split name to load, data_files or None)
    splits: dict[str, tuple[str, dict[str, str] | None]]


_C4_TRAIN = {"train": "en/c4-train.00000-of-01024.json.gz"}
_C4_VAL = {"validation": "en/c4-validation.00000-of-00008.json.gz"}

#: The splits used by the pruning papers (Wanda, SparseGPT): calibration from train, evaluation from test
#: (C4 has no test split; the papers evaluate on the first validation shard).
DATASETS: dict[str, _Dataset] = {
    "wikitext2": _Dataset(
        "wikitext",
        "wikitext-2-raw-v1",
        "text",
        {"train": ("train", None), "validation": ("validation", None), "test": ("test", None)},
    ),
    "c4": _Dataset(
        "allenai/c4",
        None,
        "text",
        {
            "train": ("train", _C4_TRAIN),
            "validation": ("validation", _C4_VAL),
            "test": ("validation", _C4_VAL),
        },
    ),
    "ptb": _Dataset(
        "ptb_text_only",
        "penn_treebank",
        "sentence",
        {"train": ("train", None), "validation": ("validation", None), "test": ("test", None)},
    ),
}


@dataclass
class TextSource:
    """Documents in order; joining and tokenizing them is the protocol's job, not the source's."""

    documents: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenSource:
    """Token ids used as given: [rows, seqlen] windows, or a 1-D stream that the protocol windows."""

    input_ids: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Hash in 1 MiB blocks so a multi-GB file never sits in memory."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_ids(ids: torch.Tensor) -> str:
    """Hash of the ids as little-endian int64 plus the shape, independent of the stored dtype."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    h.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def text_stats(documents: list[str]) -> dict[str, Any]:
    """Counts plus a hash of the joined text: the same text hashes the same whatever file it came from."""
    h = hashlib.sha256(JOINER.join(documents).encode("utf-8"))
    return {
        "documents": len(documents),
        "characters": sum(len(d) for d in documents),
        "text_sha256": h.hexdigest(),
    }


def split_documents(text: str) -> list[str]:
    """A text file holds documents separated by blank lines; empty pieces are dropped."""
    return [d.strip() for d in re.split(r"\n[ \t\r]*\n", text) if d.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrunekitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); accepted: UTF-8") from e


def _check_split(split: str) -> None:
    if split not in ACCEPTED_SPLITS:
        raise PrunekitError(f"split {split!r} is not supported; accepted: {', '.join(ACCEPTED_SPLITS)}")


def _resolve_dataset(key: str, split: str) -> TextSource:
    spec = DATASETS[key]
    load_split, data_files = spec.splits[split]
    try:
        import datasets

        ds = datasets.load_dataset(spec.path, spec.name, data_files=data_files, split=load_split)
    except Exception as e:
        raise PrunekitError(
            f"could not download dataset {key} (no network?) — use a local .txt/.jsonl file [{type(e).__name__}]"
        ) from e
    documents = [str(t) for t in ds[spec.field]]
    prov: dict[str, Any] = {
        "kind": "dataset",
        "dataset": spec.path,
        "config": spec.name,
        "split": load_split,
        "field": spec.field,
        "data_files": data_files,
        "fingerprint": getattr(ds, "_fingerprint", None),
    }
    prov.update(text_stats(documents))
    return TextSource(documents, prov)


def _resolve_txt_file(path: Path) -> TextSource:
    documents = split_documents(_read_text(path))
    prov: dict[str, Any] = {"kind": "text", "path": str(path), "sha256": sha256_file(path)}
    prov.update(text_stats(documents))
    return TextSource(documents, prov)


def _resolve_txt_folder(path: Path) -> TextSource:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise PrunekitError(f"folder {path} holds no .txt files; accepted: a folder of UTF-8 .txt files")
    documents: list[str] = []
    hashes: dict[str, str] = {}
    for f in files:
        documents.extend(split_documents(_read_text(f)))
        hashes[f.name] = sha256_file(f)
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in hashes.items()).encode()).hexdigest()
    prov: dict[str, Any] = {"kind": "text-folder", "path": str(path), "sha256": combined, "files": hashes}
    prov.update(text_stats(documents))
    return TextSource(documents, prov)


def _split_jsonl(source: str) -> tuple[Path, str] | None:
    m = re.fullmatch(r"(.+\.jsonl)(?::([^:/\\]*))?", source)
    if m is None:
        return None
    return Path(m.group(1)).expanduser(), (m.group(2) if m.group(2) is not None else "text")


def _resolve_jsonl(path: Path, key: str) -> TextSource:
    if not key:
        raise PrunekitError(f"empty field name in {str(path)!r}; accepted: file.jsonl or file.jsonl:field")
    if not path.is_file():
        raise PrunekitError(f"jsonl file {path} does not exist; accepted: an existing file.jsonl[:field]")
    documents: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrunekitError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); accepted: one JSON object a line"
                ) from e
            if not isinstance(record, dict) or key not in record:
                keys = ", ".join(sorted(record)) if isinstance(record, dict) else "none (not an object)"
                raise PrunekitError(f"{path}:{lineno} has no field {key!r}; fields there: {keys}")
            value = record[key]
            if not isinstance(value, str):
                raise PrunekitError(f"{path}:{lineno} field {key!r} is {type(value).__name__}; accepted: a string")
            documents.append(value)
    if not documents:
        raise PrunekitError(f"jsonl file {path} holds no records; accepted: one JSON object a line")
    prov: dict[str, Any] = {"kind": "jsonl", "path": str(path), "field": key, "sha256": sha256_file(path)}
    prov.update(text_stats(documents))
    return TextSource(documents, prov)


def load_token_ids(path: Path) -> TokenSource:
    """Read `input_ids` from a .safetensors file (never pickle); 1-D stream or 2-D windows, any int dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PrunekitError(f"could not read {path} as safetensors ({e}); accepted: a .safetensors file") from e
    if "input_ids" not in tensors:
        names = ", ".join(sorted(tensors)) or "none"
        raise PrunekitError(f"{path} has no 'input_ids' tensor (it has: {names}); accepted: input_ids")
    ids = tensors["input_ids"]
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise PrunekitError(f"input_ids in {path} has dtype {ids.dtype}; accepted: an integer dtype")
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise PrunekitError(
            f"input_ids in {path} has shape {list(ids.shape)}; accepted: [nsamples, seqlen] or [ntokens]"
        )
    if int(ids.min()) < 0:
        raise PrunekitError(f"input_ids in {path} holds negative id {int(ids.min())}; accepted: ids >= 0")
    ids = ids.to(torch.long)
    prov = {
        "kind": "token-ids",
        "path": str(path),
        "sha256": sha256_file(path),
        "ids_sha256": sha256_ids(ids),
        "shape": list(ids.shape),
    }
    return TokenSource(ids, prov)


def resolve_source(source: str, *, split: str = "train") -> TextSource | TokenSource:
    """Turn a SOURCE string into documents or token ids, with provenance.

    `split` (train/validation/test) only matters for the public datasets; local files are used whole.
    `self` needs a model, so it is resolved by `sample_from_model` (build_calibration does that).
    """
    _check_split(split)
    if not isinstance(source, str) or not source.strip():
        raise PrunekitError(f"source {source!r} is empty; accepted: {ACCEPTED_SOURCES}")
    key = source.strip().lower()
    if key == "self":
        raise PrunekitError("source 'self' is sampled from the model; accepted only for calibration (pass model=)")
    if key in DATASETS:
        ts = _resolve_dataset(key, split)
        ts.provenance = {"source": source, **ts.provenance}
        return ts

    resolved: TextSource | TokenSource
    jl = _split_jsonl(source)
    path = Path(source).expanduser()
    if jl is not None:
        resolved = _resolve_jsonl(*jl)
    elif not path.exists():
        raise PrunekitError(f"source {source!r} is not a file, folder or known dataset; accepted: {ACCEPTED_SOURCES}")
    elif path.is_dir():
        resolved = _resolve_txt_folder(path)
    elif path.suffix == ".safetensors":
        resolved = load_token_ids(path)
    elif path.suffix == ".txt":
        resolved = _resolve_txt_file(path)
    else:
        raise PrunekitError(
            f"source file {source!r} has an unknown type ({path.suffix or 'no suffix'}); accepted: {ACCEPTED_SOURCES}"
        )
    resolved.provenance = {"source": source, **resolved.provenance}
    return resolved


def tokenize_documents(
    tokenizer: Any, documents: list[str], *, max_tokens: int | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Join documents with JOINER and tokenize once, adding no special tokens (no BOS/EOS anywhere).

    Returns a 1-D LongTensor stream and a note of how it was tokenized. Text beyond
    SINGLE_PASS_MAX_CHARS is tokenized in chunks cut at document boundaries (each chunk ends with the
    joiner, so the concatenated text is identical; tokens may differ only where two chunks meet); only
    then can `max_tokens` stop early, since a chunk's tokens do not depend on later chunks.
    """
    text_len = sum(len(d) for d in documents) + len(JOINER) * max(len(documents) - 1, 0)

    def encode(text: str) -> list[int]:
        out = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return list(out["input_ids"])

    info: dict[str, Any] = {"joiner": JOINER, "add_special_tokens": False}
    if text_len <= SINGLE_PASS_MAX_CHARS:
        ids = torch.tensor(encode(JOINER.join(documents)), dtype=torch.long)
        info["tokenization"] = "single pass"
    else:
        parts: list[torch.Tensor] = []
        total, chunks, buf, buf_len = 0, 0, [], 0
        for i, doc in enumerate(documents):
            buf.append(doc)
            buf_len += len(doc)
            last = i == len(documents) - 1
            if buf_len >= _CHUNK_CHARS or last:
                chunk = JOINER.join(buf) + ("" if last else JOINER)
                parts.append(torch.tensor(encode(chunk), dtype=torch.int32))
                total += parts[-1].numel()
                chunks += 1
                buf, buf_len = [], 0
                if max_tokens is not None and total >= max_tokens:
                    break
        ids = torch.cat(parts).to(torch.long) if parts else torch.zeros(0, dtype=torch.long)
        info["tokenization"] = f"chunked at document boundaries ({chunks} chunks of ~{_CHUNK_CHARS} chars)"
    info["tokens"] = int(ids.numel())
    release_free_memory()  # the tokenizer's peak (~1.2 GB for a 10 MB text) must not stay resident
    return ids, info


def _start_token_id(model: Any, tokenizer: Any) -> tuple[int, str]:
    candidates = [
        ("tokenizer bos_token", getattr(tokenizer, "bos_token_id", None)),
        ("model bos_token_id", getattr(getattr(model, "generation_config", None), "bos_token_id", None)),
        ("model bos_token_id", getattr(getattr(model, "config", None), "bos_token_id", None)),
        ("tokenizer eos_token (no bos)", getattr(tokenizer, "eos_token_id", None)),
        ("model eos_token_id (no bos)", getattr(getattr(model, "config", None), "eos_token_id", None)),
    ]
    for what, tid in candidates:
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if isinstance(tid, int):
            return tid, what
    raise PrunekitError("source 'self' needs a BOS or EOS token to start from; the tokenizer and model have neither")


def sample_from_model(
    model: Any,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    batch_size: int = 8,
    top_k: int = SELF_TOP_K,
    temperature: float = SELF_TEMPERATURE,
    progress: bool = True,
) -> TokenSource:
    """Calibration text sampled from the model itself (Williams & Aletras 2024), for offline use.

    Each row is the start token (BOS, or EOS when there is no BOS) followed by seqlen-1 sampled tokens,
    so a row looks like the start of a document. EOS is suppressed until the row is full (min_new_tokens)
    so every row has exactly seqlen ids. Sampling is top-k at the given temperature, batched with the KV
    cache, under torch.manual_seed(seed) inside a forked RNG (the caller's RNG state is untouched).
    Rows are reproducible for the same seed, batch_size, model, device and software versions.
    """
    from transformers import GenerationConfig

    if nsamples < 1:
        raise PrunekitError(f"nsamples {nsamples} is too small; accepted: >= 1")
    if seqlen < 2:
        raise PrunekitError(f"seqlen {seqlen} is too small; accepted: >= 2")
    if batch_size < 1:
        raise PrunekitError(f"batch_size {batch_size} is too small; accepted: >= 1")
    start_id, start_what = _start_token_id(model, tokenizer)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is None:
        gen_eos = getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = start_id
    gen_config = GenerationConfig(
        do_sample=True,
        top_k=top_k,
        top_p=1.0,
        temperature=temperature,
        num_beams=1,
        max_new_tokens=seqlen - 1,
        min_new_tokens=seqlen - 1,
        use_cache=True,
        eos_token_id=gen_eos,
        pad_token_id=pad_id,
        bos_token_id=start_id,
    )
    device = getattr(model, "device", None) or next(model.parameters()).device
    device = torch.device(device)
    # torch.manual_seed seeds every CUDA device, so fork (and restore) all of them.
    fork_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    try:
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, nsamples, batch_size):
                n = min(batch_size, nsamples - start)
                prompt = torch.full((n, 1), start_id, dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    generation_config=gen_config,
                )
                if out.shape[1] != seqlen:
                    raise PrunekitError(
                        f"self-sampling produced {out.shape[1]} tokens per row, not seqlen {seqlen}; "
                        "accepted: a model whose generate() honours min_new_tokens"
                    )
                rows.append(out.to("cpu", torch.long))
                if progress:
                    print(f"self-sampling calibration: {start + n}/{nsamples} rows of {seqlen} tokens",
                          file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    ids = torch.cat(rows)
    prov = {
        "source": "self",
        "kind": "self",
        "model": getattr(getattr(model, "config", None), "name_or_path", None),
        "start_token_id": start_id,
        "start_token": start_what,
        "sampling": {"top_k": top_k, "temperature": temperature, "top_p": 1.0, "eos_suppressed": True},
        "seed": seed,
        "batch_size": batch_size,
        "ids_sha256": sha256_ids(ids),
        "shape": list(ids.shape),
    }
    return TokenSource(ids, prov)
