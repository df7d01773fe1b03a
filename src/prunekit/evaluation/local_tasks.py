"""Offline zero-shot tasks built from any text, as stock lm-eval task definitions.

Hub task data cannot always be downloaded, but any text a user has can be turned into two tasks that
lm-eval runs like its own (a YAML config per task plus a local JSON-lines file, `dataset_path: json`):

  * `prunekit_cloze` (LAMBADA-style): a passage of consecutive sentences with its last word removed;
    the model scores the missing word (`loglikelihood`: `acc` = the word is the greedy continuation,
    `perplexity` of the target word).
  * `prunekit_nextsent` (HellaSwag-style): a few sentences of context, then the true next sentence among
    3 distractor sentences drawn from elsewhere in the same text (`multiple_choice`: acc, acc_norm).

Examples are drawn from evenly spaced, non-overlapping places in the text with a fixed seed, so the same
text always gives the same tasks (the provenance records a hash of each data file).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunekit.data.sources import TextSource, resolve_source
from prunekit.errors import PrunekitError
from prunekit.files import atomic_write_text

CLOZE_TASK = "prunekit_cloze"
CHOICE_TASK = "prunekit_nextsent"
LOCAL_TASKS = (CLOZE_TASK, CHOICE_TASK)
VERSION = 1.0
DISTRACTORS = 3
MAX_CHOICE_WORDS = 40

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(\s+)(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"(\b[A-Z]\.|\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Gov|Sen|Rep|Lt|Col|vs|etc|No|Co|Inc)\.)$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")


@dataclass
class LocalTaskSet:
    """Where the task definitions were written, what they are named, and what they were built from."""

    folder: Path
    tasks: list[str]
    examples: dict[str, int]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "folder": str(self.folder)}


def split_sentences(documents: list[str]) -> list[list[str]]:
    """Sentences per document: whitespace collapsed, cut after . ! ? before a capital or digit.

    A cut after an abbreviation (U.S., Mr., Dr.) is undone; joining a document's sentences with one
    space gives back its whitespace-collapsed text.
    """
    out = []
    for doc in documents:
        text = " ".join(doc.split())
        sentences: list[str] = []
        cuts = [m.span(1) for m in _SENTENCE_END.finditer(text)]
        starts, ends = [0] + [b for _, b in cuts], [a for a, _ in cuts] + [len(text)]
        for piece in (text[a:b].strip() for a, b in zip(starts, ends, strict=True)):
            if sentences and _ABBREVIATION.search(sentences[-1]):
                sentences[-1] = f"{sentences[-1]} {piece}"
            elif piece:
                sentences.append(piece)
        out.append(sentences)
    return out


def _documents(source: str | list[str] | TextSource) -> tuple[list[str], dict[str, Any]]:
    if isinstance(source, list):
        return source, {"source": f"<{len(source)} documents>"}
    if isinstance(source, TextSource):
        return source.documents, dict(source.provenance)
    resolved = resolve_source(source, split="test")
    if not isinstance(resolved, TextSource):
        raise PrunekitError(f"local tasks need text, but {source!r} holds token ids; accepted: .txt, folder, .jsonl")
    return resolved.documents, dict(resolved.provenance)


def _spread(candidates: int, wanted: int, rng: random.Random) -> list[int]:
    """`wanted` evenly spaced indices in range(candidates), jittered within their stride."""
    if candidates <= wanted:
        return list(range(candidates))
    stride = candidates / wanted
    return [min(candidates - 1, int(i * stride + rng.random() * stride)) for i in range(wanted)]


def cloze_examples(sentences: list[list[str]], n: int, *, seed: int, min_words: int = 30) -> list[dict[str, str]]:
    """Passages of consecutive sentences (>= min_words words) that end in a plain word; that word is the target.

    A passage never crosses a document boundary, and passages never overlap.
    """
    passages: list[str] = []
    for doc in sentences:
        buf: list[str] = []
        for sentence in doc:
            buf.append(sentence)
            words = " ".join(buf).split()
            if len(words) >= min_words:
                passages.append(" ".join(buf))
                buf = []
    rng = random.Random(seed)
    examples = []
    for i in _spread(len(passages), n * 2, rng):
        passage = passages[i].rstrip(" .!?\"')]")
        context, _, last = passage.rpartition(" ")
        if context and _WORD.match(last) and len(last) >= 3:
            examples.append({"context": context, "target": " " + last, "passage": passage})
    return examples[:n]


def choice_examples(sentences: list[list[str]], n: int, *, seed: int, context_sentences: int = 2
                    ) -> list[dict[str, Any]]:
    """Context sentences, then the true next sentence and 3 distractors from other places of the text.

    Distractors are at least 10 sentences away from the true one and differ from it and each other.
    """
    flat = [(d, s) for d, doc in enumerate(sentences) for s in range(len(doc))]
    pool = [sentences[d][s] for d, s in flat]
    def fits(sentence: str) -> bool:  # a real sentence, short enough to be an ending (as in HellaSwag)
        return 4 <= len(sentence.split()) <= MAX_CHOICE_WORDS

    positions = [k for k, (d, s) in enumerate(flat) if s >= context_sentences and fits(pool[k])]
    if len(pool) < DISTRACTORS + context_sentences + 1 + 20:
        return []
    rng = random.Random(seed)
    examples = []
    for k in _spread(len(positions), n, rng):
        pos = positions[k]
        d, s = flat[pos]
        true = sentences[d][s]
        distractors: list[str] = []
        for _ in range(200):
            j = rng.randrange(len(pool))
            if abs(j - pos) >= 10 and fits(pool[j]) and pool[j] != true and pool[j] not in distractors:
                distractors.append(pool[j])
            if len(distractors) == DISTRACTORS:
                break
        if len(distractors) < DISTRACTORS:
            continue
        choices = [true, *distractors]
        rng.shuffle(choices)
        examples.append({"context": " ".join(sentences[d][s - context_sentences:s]), "choices": choices,
                         "label": choices.index(true)})
    return examples


def _task_config(name: str, data_file: Path, kind: str) -> dict[str, Any]:
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "metadata": {"version": VERSION},
    }
    if kind == "cloze":
        # loglikelihood requests use doc_to_target as given: the target carries its leading space.
        return {**common, "output_type": "loglikelihood", "doc_to_target": "{{target}}", "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "multiple_choice", "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}",
            "target_delimiter": " ", "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_local_tasks(
    source: str | list[str] | TextSource,
    folder: str | Path,
    *,
    n: int = 500,
    seed: int = 0,
    min_examples: int = 10,
) -> LocalTaskSet:
    """Write the cloze and next-sentence tasks for `source` into `folder` (one YAML + one .jsonl each).

    Pass `folder` as lm-eval's `include_path` to run them. Raises PrunekitError when the text is too
    short for `min_examples` examples of each task.
    """
    if not isinstance(n, int) or n < 1:
        raise PrunekitError(f"number of local examples {n!r} is invalid; accepted: an integer >= 1")
    documents, prov = _documents(source)
    sentences = split_sentences(documents)
    cloze = cloze_examples(sentences, n, seed=seed)
    choice = choice_examples(sentences, n, seed=seed + 1)
    name = prov.get("source", "source")
    need = min(min_examples, n)
    if len(cloze) < need or len(choice) < need:
        raise PrunekitError(
            f"text {name!r} is too short for local tasks: {len(cloze)} cloze and {len(choice)} next-sentence "
            f"examples, need {need} of each; accepted: a longer text (a few thousand words)")
    out = Path(folder)
    hashes = {}
    for task, rows, kind in ((CLOZE_TASK, cloze, "cloze"), (CHOICE_TASK, choice, "choice")):
        data = out / f"{task}.jsonl"
        hashes[task] = _write_jsonl(data, rows)
        atomic_write_text(out / f"{task}.yaml", yaml.safe_dump(_task_config(task, data, kind), sort_keys=False))
    provenance = {**prov, "seed": seed, "requested": n, "data_sha256": hashes,
                  "sentences": sum(len(s) for s in sentences),
                  "construction": "cloze: last word of >=30-word passages; nextsent: 2 context sentences, "
                                  f"true next sentence + {DISTRACTORS} distractors >=10 sentences away, "
                                  f"4-{MAX_CHOICE_WORDS} words each"}
    return LocalTaskSet(out, list(LOCAL_TASKS), {CLOZE_TASK: len(cloze), CHOICE_TASK: len(choice)}, provenance)
