"""Short one-line messages for errors raised while loading models."""

from __future__ import annotations

from rich.console import Console

MAX_MESSAGE = 300


def truncate(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError):  # str(KeyError('x')) is just "'x'"
        text = f"missing key {text}"
    return truncate(text)


def console_line(message: str) -> None:
    """One progress line on stderr, for slow one-time work (conversions, downloads)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(message, markup=False)
