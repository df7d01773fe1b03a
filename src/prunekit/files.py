"""Every file prunekit writes goes through here: written whole or not at all, never deleting what it did not write.

* `atomic_write` (and its text/JSON/safetensors forms): write to a temporary file beside the target, flush,
  fsync, rename over the target, fsync the folder. A crash or a failing writer leaves the old file (or none),
  never a half-written one.
* `check_output_dir` / `publish_dir`: an output folder is staged under a hidden name beside its target and
  renamed into place. `--overwrite` replaces only a folder that prunekit wrote (it holds `prunekit.json` or a
  command's own marker file) or an empty one; anything else is refused with one line naming it.
* `check_output_file`: the same rule for a single JSON summary (`--save-json`): only one prunekit wrote
  (its "kind" is prunekit.…) is replaced.
* `append_lines` / `read_jsonl`: the one file that grows instead of being replaced — a resumable run's log of
  finished work (e.g. a safety run's responses.jsonl). Each append is flushed and fsynced before it returns,
  so what returned is on disk; a line torn by a crash mid-append is cut off before the next append and
  skipped by the reader, so it never corrupts the lines before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from prunekit.errors import PrunekitError

MANIFEST = "prunekit.json"
#: Marker a command leaves in an output folder that has no manifest (sweep, report, safety, eval).
MARKER = ".prunekit-output"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on an error it vanishes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode {mode!r}: expected 'w' or 'wb'")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_save_tensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file, written whole (safetensors' own `save` gives the bytes; no pickle anywhere)."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure, written whole (the format comes from the suffix)."""
    target = Path(path)
    kwargs.setdefault("format", target.suffix.lstrip(".") or "png")
    with atomic_write(target, "wb") as handle:
        fig.savefig(handle, **kwargs)
    return target


def _cut_torn_tail(path: Path) -> int:
    """Truncate `path` after its last newline (a crash may have left half a line); returns the bytes cut."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return 0
        step, end = 65536, size
        while end > 0:  # scan back for the last newline
            start = max(0, end - step)
            handle.seek(start)
            chunk = handle.read(end - start)
            found = chunk.rfind(b"\n")
            if found >= 0:
                keep = start + found + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
        return size - keep


def append_lines(path: str | Path, lines: list[str]) -> Path:
    """Append whole lines to `path` (created if absent) and fsync before returning.

    A torn last line from an earlier crash is cut off first, so the file is always a sequence of complete
    lines. Lines must not contain a newline themselves (one record per line).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if any("\n" in line for line in lines):
        raise ValueError("append_lines: a line contains a newline")
    created = not target.exists()
    if not created:
        _cut_torn_tail(target)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        _fsync_dir(target.parent)
    return target


def read_jsonl(path: str | Path) -> list[Any]:
    """The complete JSON lines of `path` (an unfinished last line, left by a crash mid-append, is skipped)."""
    target = Path(path)
    if not target.exists():
        return []
    data = target.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


# -- output folders ---------------------------------------------------------------------------------------


def is_prunekit_output(folder: Path) -> bool:
    """A folder prunekit may replace: it holds a manifest or a marker, or it is empty."""
    try:
        return (folder / MANIFEST).is_file() or (folder / MARKER).is_file() or not any(folder.iterdir())
    except OSError:
        return False


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output before any work: without `overwrite` always, with it unless prunekit wrote it."""
    out = Path(out_dir).expanduser()
    if not out.exists():
        return out
    if not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder; choose another --out")
    if not overwrite:
        raise PrunekitError(f"output folder {out} already exists; pass --overwrite to replace it")
    if not is_prunekit_output(out):
        raise PrunekitError(
            f"refusing to overwrite {out}: it is not a prunekit output (no {MANIFEST} or {MARKER}) and not "
            "empty; choose another --out or remove it yourself"
        )
    return out


def staging_dir(out: Path, name: str = "partial") -> Path:
    """The hidden folder beside `out` where its content is built (a fixed name, so a run can resume)."""
    return out.parent / f".{out.name}.{name}"


def new_staging_dir(out: Path) -> Path:
    """A fresh, uniquely named staging folder beside `out` (for outputs that are not resumable)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def publish_dir(staging: Path, out: Path) -> Path:
    """Rename a finished staging folder into place; an existing `out` (checked replaceable) is retired first."""
    _fsync_dir(staging)
    if out.exists():
        if not is_prunekit_output(out):  # re-checked: the folder may have changed since the run started
            raise PrunekitError(f"refusing to overwrite {out}: it is not a prunekit output")
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
    _fsync_dir(out.parent)
    return out


def remove_own_dir(folder: Path) -> None:
    """Delete a folder only if prunekit made it (a staging folder, or a folder with its manifest/marker)."""
    if not folder.exists():
        return
    own = folder.name.startswith(".") and ".partial" in folder.name
    if not (own or is_prunekit_output(folder)):
        raise PrunekitError(f"refusing to delete {folder}: prunekit did not write it")
    shutil.rmtree(folder)


def is_prunekit_file(path: Path) -> bool:
    """A JSON summary prunekit wrote: an object whose "kind" names a prunekit record (prunekit.eval, ...)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("kind", "")).startswith("prunekit.")


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--save-json") -> Path:
    """Refuse an existing output file before any work: without `overwrite` always, with it unless prunekit wrote it."""
    out = Path(path).expanduser()
    if not out.exists():
        return out
    if out.is_dir():
        raise PrunekitError(f"{flag} {out} is a folder; accepted: a file name, e.g. {out / 'eval.json'}")
    if not overwrite:
        raise PrunekitError(f"{flag} file {out} already exists; pass --overwrite to replace it")
    if not is_prunekit_file(out):
        raise PrunekitError(f"refusing to overwrite {out}: it is not a prunekit summary (a JSON object with "
                            '"kind": "prunekit.…"); choose another file or remove it yourself')
    return out


def write_marker(folder: Path, command: str) -> None:
    """Mark an output folder as written by `command`, so a later --overwrite may replace it."""
    atomic_write_json(folder / MARKER, {"written_by": f"prunekit {command}"})
