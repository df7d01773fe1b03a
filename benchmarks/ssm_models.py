"""Train the small state-space models (and a same-size LLaMA) that benchmarks/ssm.py prunes.

No pretrained Mamba checkpoint is reachable here, so the project makes its own real ones: a seeded, resumable
run per architecture on ../shared/data (SOTU train.txt 1790–1979 + the first 80 % of the documents of
every Brown genre; the last 20 % are held out for evaluation), with a byte-level BPE
vocabulary of 4096 tokens trained on the same text (SmolLM2's 49,152-token embedding would hold most of the
parameters of models this small). Models:

    mamba    MambaForCausalLM   hidden 128, 4 layers, expand 2, state 16, dt rank 8
    mamba2   Mamba2ForCausalLM  hidden 128, 4 layers, expand 2, 8 heads x 32, 4 B/C groups, state 16
    llama    LlamaForCausalLM   hidden 128, 4 layers, 4 heads (2 KV), MLP 176   (the same block parameters, ~470 k)

Training: AdamW (lr 3e-3, warm-up 20 steps, cosine to 10 %), batch 16 x 128 tokens drawn at seeded offsets
(the windows of step k depend only on the seed and k), fp32, tied embeddings. A checkpoint (model + optimizer
state as safetensors, the step and loss curve as JSON) is written through prunekit.files every
`--save-every` steps, so a killed run continues where it stopped (`python benchmarks/ssm_models.py` again).
The finished model is an ordinary transformers folder under ~/.cache/prunekit/ssm-models/NAME (or
$PRUNEKIT_CACHE/ssm-models/NAME) with the tokenizer and a `training.json`.

    python benchmarks/ssm_models.py --model mamba2 [--steps 300] [--threads 1]
    python benchmarks/ssm_models.py --all      # one after the other (benchmarks/background.sh for long runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("PRUNEKIT_SHARED_DATA", "/work/shared/data")) / "corpora"
VOCAB = 4096
SEQLEN = 128
BATCH = 16
LR = 3e-3
WARMUP = 20
#: Share of each Brown genre's documents (the last ones) kept out of training for evaluation.
BROWN_HELD_OUT = 0.2
MODELS = ("mamba", "mamba2", "llama")


def cache_root() -> Path:
    from prunekit.models.cache import model_cache_dir

    return model_cache_dir() / "ssm-models"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def brown_split() -> tuple[list[str], dict[str, list[str]]]:
    """Documents of every Brown genre: the first 80 % of each genre train, the last 20 % (by genre) are held
    out for evaluation (benchmarks/ssm.py), so that Brown perplexity is measured on text the models never saw."""
    from prunekit.data.sources import split_documents

    train: list[str] = []
    held_out: dict[str, list[str]] = {}
    for path in sorted((SHARED / "brown").glob("*.txt")):
        docs = split_documents(path.read_text())
        cut = max(1, round(len(docs) * (1 - BROWN_HELD_OUT)))
        train += docs[:cut]
        held_out[path.stem] = docs[cut:]
    return train, held_out


def training_text() -> str:
    """SOTU train.txt and the training part of every Brown genre, in a fixed order (SOTU test.txt and the
    held-out Brown documents stay out)."""
    return "\n\n".join([(SHARED / "sotu" / "train.txt").read_text(), *brown_split()[0]])


def tokenizer(folder: Path):
    """A 4096-token byte-level BPE trained once on the training text (deterministic), shared by the models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.files import atomic_write_text

    path = folder / "tokenizer.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        text = training_text()
        tk.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
        atomic_write_text(path, tk.to_str())
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def build(name: str, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 4, "tie_word_embeddings": True,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if name == "mamba":
        return MambaForCausalLM(MambaConfig(**common, state_size=16, expand=2, time_step_rank=8, conv_kernel=4))
    if name == "mamba2":
        return Mamba2ForCausalLM(Mamba2Config(**common, num_heads=8, head_dim=32, expand=2, n_groups=4, state_size=16,
                                              conv_kernel=4, chunk_size=64))
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, intermediate_size=176, num_attention_heads=4,
                                            num_key_value_heads=2, max_position_embeddings=1024))
    raise SystemExit(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")


def _training_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **_ignored):
    """Mamba-1's selective scan, the same recurrence as transformers' reference `mamba_selective_scan`, written
    so that autograd stays cheap on a CPU: the reference slices one [b, d, L, n] tensor per time step, and the
    backward of every slice writes a full-size gradient (17 s per step of 16 x 128 tokens here, against ~2 s).
    Only used while training; evaluation runs the stock module."""
    import torch.nn.functional as F

    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    u = hidden_states.float()
    B, C = B.float(), C.float()  # [b, n, L]
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[-1])
    outputs = []
    for t in range(u.shape[-1]):
        dt_t = dt[:, :, t, None]
        state = torch.exp(A[None] * dt_t) * state + (dt_t * u[:, :, t, None]) * B[:, None, :, t]
        outputs.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    y = y.to(hidden_states.dtype)
    return (y, state) if return_last_state else y


def batch_at(ids: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """The windows of step `step`: seeded by (seed, step) alone, so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - SEQLEN - 1, (BATCH,), generator=generator)
    return torch.stack([ids[s : s + SEQLEN] for s in starts.tolist()])


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_state(work: Path, model, optimizer, step: int, record: dict) -> None:
    from prunekit.files import atomic_save_tensors, atomic_write_json

    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key != "step":
                    tensors[f"optim.{names[id(p)]}.{key}"] = value
    atomic_save_tensors(tensors, work / "state.safetensors")
    atomic_write_json(work / "state.json", {**record, "step": step})  # written last: names a complete state


def _load_state(work: Path, model, optimizer) -> tuple[int, dict]:
    from safetensors.torch import load_file

    record = json.loads((work / "state.json").read_text())
    tensors = load_file(str(work / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    model.tie_weights()
    step = record["step"]
    for name, p in model.named_parameters():
        keys = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
        if keys:
            optimizer.state[p] = {"step": torch.tensor(float(step)), **keys}
    return step, record


def train(name: str, steps: int, seed: int, save_every: int) -> Path:
    from prunekit.files import atomic_write_json

    root = cache_root()
    final = root / name
    if (final / "training.json").is_file():
        log(f"{name}: already trained at {final}")
        return final
    tok = tokenizer(root / "tokenizer")
    ids_path = root / "tokenizer" / "train_ids.safetensors"
    if ids_path.is_file():
        from safetensors.torch import load_file

        ids = load_file(str(ids_path))["ids"]
    else:
        from prunekit.files import atomic_save_tensors

        ids = torch.tensor(tok(training_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
        atomic_save_tensors({"ids": ids}, ids_path)
    work = root / f".work-{name}"
    work.mkdir(parents=True, exist_ok=True)
    model = build(name, seed).train()
    if name == "mamba":
        import transformers.models.mamba.modeling_mamba as modeling_mamba

        modeling_mamba.mamba_selective_scan = _training_scan
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95))
    step, record = 0, {"losses": [], "seconds": 0.0}
    if (work / "state.json").is_file():
        step, record = _load_state(work, model, optimizer)
        log(f"{name}: resuming at step {step}")
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log(f"{name}: {params:,} parameters, {ids.numel():,} training tokens, {steps} steps of {BATCH}x{SEQLEN}")
    started = last = time.perf_counter()
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        batch = batch_at(ids, step, seed)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        record["losses"].append(round(loss.item(), 4))
        if step % 10 == 0:
            now = time.perf_counter()
            log(f"{name}: step {step}/{steps} loss {sum(record['losses'][-10:]) / 10:.3f} "
                f"({(now - last) / 10:.2f} s/step)")
            last = now
        if step % save_every == 0 or step == steps:
            record["seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            _save_state(work, model, optimizer, step, record)
    model.eval()
    stage = root / f".stage-{name}"
    shutil.rmtree(stage, ignore_errors=True)  # ours: a half-written final folder of an earlier kill
    model.save_pretrained(stage)
    tok.save_pretrained(stage)
    atomic_write_json(stage / "training.json", {
        "model": name, "parameters": params, "steps": steps, "batch": BATCH, "seqlen": SEQLEN, "seed": seed,
        "tokens": steps * BATCH * SEQLEN, "lr": LR, "warmup": WARMUP, "vocab": VOCAB,
        "data": f"sotu/train.txt + brown/*.txt without the last {BROWN_HELD_OUT:.0%} of each genre's documents",
        "threads": torch.get_num_threads(),
        "train_seconds": round(record["seconds"], 1), "final_loss_mean_last_20": sum(record["losses"][-20:]) / 20,
        "losses": record["losses"]})
    stage.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: saved {final}")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = MODELS if args.all else [args.model] if args.model else None
    if not names:
        parser.error("pass --model NAME or --all")
    for name in names:
        train(name, args.steps, args.seed, args.save_every)


if __name__ == "__main__":
    main()
