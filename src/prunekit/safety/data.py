"""Safety prompts: tasks, jailbreak templates and their combination, read from the paper's formats or plain lists.

Formats (chosen by suffix, then by shape; anything else is a one-line `PrunekitError`):

* ``malicious_tasks_dataset.yaml``: category → subcategory → severity → [task, ...];
* ``integrated.yaml`` / ``benign_integrated.yaml``: template → (nested categories or a flat list) → prompts.
  The task of each prompt is its ``ORIGINAL`` entry without the surrounding quotes, and each template is
  recovered as the prompt with the task replaced by ``{task}`` — so the task's span inside every prompt is
  known (the attention analysis needs it);
* ``benign_tasks.json``: {id: task} or [task, ...];
* CSV / JSONL: one prompt per row in a ``goal`` (AdvBench), ``task``, ``prompt`` or ``text`` column, with optional
  ``category``, ``subcategory``, ``severity`` and ``id`` columns; ``.txt``: one task per line;
* user templates: a ``.txt`` file (one template named after the file) or a YAML/JSON mapping name → text, each
  with exactly one ``{task}`` slot (filled by plain replacement, so other braces in a template are kept).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from prunekit.errors import PrunekitError
from prunekit.safety.templates import PAPER_TEMPLATES

SLOT = "{task}"
TEXT_COLUMNS = ("goal", "task", "prompt", "text")
META_COLUMNS = ("category", "subcategory", "severity")
_SUPPORTED = ".yaml/.yml (paper task tree or integrated templates), .json, .jsonl, .csv, .txt"


@dataclass(frozen=True)
class Task:
    """One task (the bare request) with its place in the paper's taxonomy, when known."""

    id: str
    text: str
    category: str | None = None
    subcategory: str | None = None
    severity: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Template:
    """A prompt template with one ``{task}`` slot; ``ORIGINAL`` is the bare task (the paper quotes it)."""

    name: str
    text: str

    def __post_init__(self) -> None:
        if self.text.count(SLOT) != 1:
            raise PrunekitError(f"template {self.name!r} must contain exactly one {SLOT} slot "
                                f"(found {self.text.count(SLOT)})")

    def render(self, task: str) -> tuple[str, tuple[int, int]]:
        """The prompt and the character span of the task inside it."""
        start = self.text.index(SLOT)
        return self.text.replace(SLOT, task, 1), (start, start + len(task))


@dataclass(frozen=True)
class Prompt:
    """A task inside a template: the user message that is sent, and where the task sits in it."""

    task: Task
    template: str
    text: str
    span: tuple[int, int]

    def meta(self) -> dict[str, Any]:
        return {"task_id": self.task.id, "template": self.template, "category": self.task.category,
                "subcategory": self.task.subcategory, "severity": self.task.severity}


def paper_templates() -> dict[str, Template]:
    """The paper's 11 templates (AIM ... TRANSLATOR and ORIGINAL), embedded in the package."""
    return {name: Template(name, text) for name, text in PAPER_TEMPLATES.items()}


# --------------------------------------------------------------------------------------------------
# readers


def _load_structured(path: Path) -> Any:
    if not path.is_file():
        raise PrunekitError(f"safety data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix in (".yaml", ".yml"):
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            return yaml.load(text, Loader=loader)  # a safe loader (C version when built)
        if suffix == ".json":
            return json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())[:200]
        raise PrunekitError(f"{path} is not valid {suffix[1:].upper()}: {detail}") from error
    raise PrunekitError(f"unsupported safety data file {path.name!r}; expected {_SUPPORTED}")


def _is_task_tree(data: Any) -> bool:
    """category → subcategory → severity → list of strings."""
    if not isinstance(data, dict) or not data:
        return False
    for sub in data.values():
        if not isinstance(sub, dict) or not sub:
            return False
        for sev in sub.values():
            if not isinstance(sev, dict) or not all(isinstance(v, list) for v in sev.values()):
                return False
    return True


def _tree_tasks(tree: dict, prefix: str = "") -> list[Task]:
    tasks = []
    for category, subs in tree.items():
        for subcategory, sevs in subs.items():
            for severity, items in sevs.items():
                for i, text in enumerate(items):
                    tasks.append(Task(f"{prefix}{category}/{subcategory}/{severity}/{i}", str(text).strip(),
                                      str(category), str(subcategory), _severity(severity)))
    return tasks


def _severity(value: Any) -> str | None:
    """'Low Severity' → 'Low', so tables stay narrow."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    return text[: -len(" Severity")] if text.endswith(" Severity") else text


def _is_integrated(data: Any) -> bool:
    return isinstance(data, dict) and "ORIGINAL" in data and all(
        isinstance(v, list) or _is_task_tree(v) for v in data.values())


def _flatten(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(v) for subs in value.values() for sevs in subs.values() for items in sevs.values() for v in items]


def read_integrated(path: str | Path) -> tuple[list[Task], dict[str, Template]]:
    """Tasks and templates of an ``integrated.yaml``; every template is checked against every prompt."""
    path = Path(path)
    data = _load_structured(path)
    if not _is_integrated(data):
        raise PrunekitError(f"{path} is not an integrated template file (template → prompts with an ORIGINAL entry)")
    original = data["ORIGINAL"]
    bare = [p[1:-1] if len(p) >= 2 and p[0] == p[-1] == "'" else p for p in _flatten(original)]
    if isinstance(original, list):
        tasks = [Task(str(i), text) for i, text in enumerate(bare)]
    else:
        tree = _tree_tasks(original)
        tasks = [Task(t.id, text, t.category, t.subcategory, t.severity) for t, text in zip(tree, bare, strict=True)]
    if not tasks:
        raise PrunekitError(f"{path} holds no tasks")
    templates: dict[str, Template] = {}
    for name, value in data.items():
        prompts = _flatten(value)
        if len(prompts) != len(tasks):
            raise PrunekitError(f"{path}: template {name!r} has {len(prompts)} prompts, ORIGINAL has {len(tasks)}")
        found = {p.replace(t.text, SLOT, 1) for t, p in zip(tasks, prompts, strict=True) if t.text in p}
        if len(found) != 1 or any(t.text not in p for t, p in zip(tasks, prompts, strict=True)):
            raise PrunekitError(f"{path}: the prompts of template {name!r} are not one template filled with the tasks")
        templates[str(name)] = Template(str(name), found.pop())
    return tasks, templates


def _rows_tasks(rows: Iterable[dict[str, Any]], path: Path) -> list[Task]:
    tasks = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PrunekitError(f"{path}: row {i + 1} is not an object with a {'/'.join(TEXT_COLUMNS)} field")
        lower = {str(k).strip().lower(): v for k, v in row.items()}
        column = next((c for c in TEXT_COLUMNS if c in lower), None)
        if column is None:
            raise PrunekitError(f"{path}: row {i + 1} has none of the columns {', '.join(TEXT_COLUMNS)}")
        text = str(lower[column] or "").strip()
        if not text:
            continue
        meta = {c: (str(lower[c]).strip() or None) if lower.get(c) is not None else None for c in META_COLUMNS}
        tasks.append(Task(str(lower.get("id") or i), text, meta["category"], meta["subcategory"],
                          _severity(meta["severity"])))
    return tasks


def read_tasks(path: str | Path) -> list[Task]:
    """The tasks of any supported file (for an integrated file: its ORIGINAL tasks)."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"safety data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        data = _load_structured(path)
        if _is_task_tree(data):
            tasks = _tree_tasks(data)
        elif _is_integrated(data):
            tasks = read_integrated(path)[0]
        elif isinstance(data, dict) and data and all(isinstance(v, str) for v in data.values()):
            tasks = [Task(str(k), v.strip()) for k, v in data.items() if v.strip()]
        elif isinstance(data, list) and all(isinstance(v, str) for v in data):
            tasks = [Task(str(i), v.strip()) for i, v in enumerate(data) if v.strip()]
        elif isinstance(data, list) and all(isinstance(v, dict) for v in data):
            tasks = _rows_tasks(data, path)
        else:
            raise PrunekitError(f"{path} is in none of the supported layouts (task tree, integrated templates, "
                                "{id: task}, [task, ...] or [{goal: ...}, ...])")
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise PrunekitError(f"{path}: line {n + 1} is not JSON ({error.msg})") from error
        tasks = _rows_tasks(rows, path)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {f.strip().lower() for f in reader.fieldnames} & set(TEXT_COLUMNS):
                raise PrunekitError(f"{path}: the CSV header has none of the columns {', '.join(TEXT_COLUMNS)}")
            tasks = _rows_tasks(reader, path)
    elif suffix == ".txt":
        tasks = [Task(str(i), line.strip()) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
                 if line.strip()]
    else:
        raise PrunekitError(f"unsupported safety data file {path.name!r}; expected {_SUPPORTED}")
    if not tasks:
        raise PrunekitError(f"{path} holds no tasks")
    return tasks


def read_templates(path: str | Path) -> dict[str, Template]:
    """User templates: a .txt file (one template) or a YAML/JSON mapping name → text, or an integrated.yaml."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"template file {path} does not exist")
    if path.suffix.lower() == ".txt":
        return {path.stem: Template(path.stem, path.read_text(encoding="utf-8").strip("\n"))}
    data = _load_structured(path)
    if _is_integrated(data):
        return read_integrated(path)[1]
    if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
        raise PrunekitError(f"{path} is not a template file (a mapping name → text with one {SLOT} slot)")
    return {str(k): Template(str(k), v) for k, v in data.items()}


def select_templates(names: Sequence[str] | None, available: dict[str, Template]) -> list[Template]:
    """The named templates in the given order (all when `names` is None); unknown names are an error."""
    if names is None:
        return list(available.values())
    chosen = []
    for name in names:
        key = name.strip()
        match = available.get(key) or next((t for n, t in available.items() if n.lower() == key.lower()), None)
        if match is None:
            raise PrunekitError(f"unknown template {key!r}; expected one of {', '.join(available)}")
        chosen.append(match)
    if not chosen:
        raise PrunekitError("no template selected; expected e.g. --templates ORIGINAL,AIM")
    return chosen


def subset(tasks: Sequence[Task], limit: int | None) -> list[Task]:
    """`limit` tasks spread evenly over the list, so every category keeps a share of a small run."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    if limit < 1:
        raise PrunekitError(f"--limit {limit} must be at least 1")
    step = len(tasks) / limit
    return [tasks[int(i * step)] for i in range(limit)]


def build_prompts(tasks: Sequence[Task], templates: Sequence[Template]) -> list[Prompt]:
    """Every task inside every template (template-major order)."""
    if not tasks:
        raise PrunekitError("the task list is empty")
    prompts = []
    for template in templates:
        for task in tasks:
            text, span = template.render(task.text)
            prompts.append(Prompt(task, template.name, text, span))
    return prompts


def load_suite(source: str | Path, template_files: Sequence[str | Path] = ()) -> tuple[list[Task], dict[str, Template]]:
    """Tasks of `source` and the templates available for them: the paper's, those of an integrated source
    file (which win, being the exact prompts of that file) and the user's template files."""
    tasks = read_tasks(source)
    templates = paper_templates()
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml") and _is_integrated(_load_structured(path)):
        templates.update(read_integrated(path)[1])
    for file in template_files:
        templates.update(read_templates(file))
    return tasks, templates
