"""From a user message to the model's answer: chat formatting, the task's token span, batched greedy decoding.

A chat model must see a prompt the way it was aligned to see it, so prompts go through the tokenizer's own
chat template (`apply_chat_template`); base models get a plain ``User: ... Assistant:`` frame. Decoding is
greedy (the verdict must not depend on a sampling seed), batched with LEFT padding so that every row's last
prompt token sits at the same position and the KV cache is shared by the batch.

Two decoders give the same tokens: `generate` here — `model.generate` on whole prompts (kept as the reference
and for comparison) — and the fast path of a study, `prunekit.safety.decode.decode_batches`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from prunekit.errors import PrunekitError

Mode = Literal["chat", "plain", "auto"]
PLAIN_TEMPLATE = "User: {message}\nAssistant:"


def decoding_setup(model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int) -> tuple[Any, int, set[int]]:
    """The checks and constants both decoders share: device, padding id and stop ids."""
    if max_new_tokens < 1:
        raise PrunekitError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if batch_size < 1:
        raise PrunekitError(f"batch size {batch_size} must be at least 1")
    return next(model.parameters()).device, _pad_id(tokenizer, model), set(_stop_ids(tokenizer, model))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_mode(tokenizer: Any, mode: Mode) -> Literal["chat", "plain"]:
    """'auto' → chat when the tokenizer has a chat template; asking for chat without one is an error."""
    if mode not in ("chat", "plain", "auto"):
        raise PrunekitError(f"unknown prompt format {mode!r}; expected chat, plain or auto")
    if mode == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if mode == "chat" and not has_chat_template(tokenizer):
        raise PrunekitError("the model's tokenizer has no chat template; use --format plain for a base model")
    return mode


@dataclass(frozen=True)
class Encoded:
    """A formatted prompt as token ids, with the token span of the task (for the attention analysis)."""

    text: str
    ids: list[int]
    span: tuple[int, int] | None  # token indices [start, end) of the task inside `ids`


def format_message(tokenizer: Any, message: str, mode: Literal["chat", "plain"]) -> tuple[str, int]:
    """The full prompt string and the character offset of `message` inside it."""
    if mode == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
        if not isinstance(text, str):
            raise PrunekitError("the tokenizer's chat template did not return text")
    else:
        text = PLAIN_TEMPLATE.format(message=message)
        if _wants_bos(tokenizer):
            text = tokenizer.bos_token + text
    offset = text.rfind(message)
    if offset < 0:  # templates that trim the content (`| trim`): find the stripped message, keep char offsets
        stripped = message.strip()
        found = text.rfind(stripped) if stripped else -1
        if found < 0:
            raise PrunekitError("the chat template rewrote the user message; cannot locate the task inside it")
        offset = found - (len(message) - len(message.lstrip()))
    return text, offset


def _wants_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer would put a BOS in front of plain text (Llama-style), so the plain frame keeps it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode(tokenizer: Any, message: str, mode: Literal["chat", "plain"],
           span: tuple[int, int] | None = None) -> Encoded:
    """Format and tokenize one message; `span` (characters, inside `message`) becomes a token span."""
    text, offset = format_message(tokenizer, message, mode)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        token_span = None
        if span is not None:
            lo, hi = offset + span[0], offset + span[1]
            inside = [i for i, (a, b) in enumerate(offsets) if b > lo and a < hi and b > a]
            token_span = (inside[0], inside[-1] + 1) if inside else None
        return Encoded(text, ids, token_span)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    token_span = None
    if span is not None:  # slow tokenizer: count the tokens of the prefixes (boundaries may merge by one token)
        def count(chars: int) -> int:
            return len(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])

        token_span = (count(offset + span[0]), count(offset + span[1]))
    return Encoded(text, list(ids), token_span)


def _pad_id(tokenizer: Any, model: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                      getattr(model.generation_config, "pad_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask, padded on the left so that all prompts end at the last position."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


@dataclass
class Generation:
    """Answers in prompt order, their new token ids, and the cost."""

    texts: list[str]
    token_ids: list[list[int]]
    seconds: float
    batch_size: int
    max_new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompts_per_second(self) -> float:
        return len(self.texts) / self.seconds if self.seconds > 0 else float("nan")

    def describe(self) -> dict[str, Any]:
        return {"prompts": len(self.texts), "seconds": self.seconds, "prompts_per_s": self.prompts_per_second,
                "new_tokens": sum(len(t) for t in self.token_ids), "batch_size": self.batch_size,
                "max_new_tokens": self.max_new_tokens, **self.extra}


def _stop_ids(tokenizer: Any, model: Any) -> list[int]:
    found = model.generation_config.eos_token_id
    stops = list(found) if isinstance(found, list | tuple) else ([found] if found is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int = 64,
             batch_size: int = 16, sort_by_length: bool = True) -> Generation:
    """Greedy answers to tokenized prompts, batched with left padding and a KV cache.

    Prompts are sorted by length inside the call (less padding) and the answers returned in input order.
    Decoding stops at the model's end-of-turn / EOS tokens; the stop token is not part of the answer.
    """
    device, pad_id, stops = decoding_setup(model, tokenizer, max_new_tokens, batch_size)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if sort_by_length else list(range(len(prompts)))
    results: list[list[int]] = [[] for _ in prompts]
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0, use_cache=True,
                             pad_token_id=pad_id, eos_token_id=sorted(stops) or None, temperature=None, top_p=None,
                             top_k=None, repetition_penalty=None)
        new = out[:, ids.shape[1]:].tolist()
        for row, i in zip(new, chunk, strict=True):
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            results[i] = row[:cut]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in results]
    return Generation(texts, results, seconds, batch_size, max_new_tokens)
