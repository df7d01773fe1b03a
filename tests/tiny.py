"""Test helpers: tiny random models of every family (built from config, no download), a tiny trained
tokenizer, and an in-process CLI runner."""

from __future__ import annotations

import random

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
HIDDEN = 64
FFN = 128


def build(family: str, vocab: int = VOCAB, seed: int = 0, max_positions: int = 256) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions,
            sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(
            vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=max_positions, word_embed_proj_dim=HIDDEN))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=max_positions,
            bos_token_id=0, eos_token_id=0))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_positions))
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ("llama", "qwen2", "gemma3", "opt", "gpt2", "gpt_neox")


def random_ids(n: int = 6, seqlen: int = 32, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=generator)


WORDS = ("the of and to a in that is was he for it with as his on be at by this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more").split()


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(50)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    from prunekit.cli import main

    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), err
    assert needle in lines[-1], lines[-1]
    assert "Traceback" not in err


def save_tiny_llama(folder):
    """A tiny random llama and its toy tokenizer saved as an HF folder (context long enough for sentences)."""
    tokenizer = make_tokenizer()
    build("llama", vocab=len(tokenizer), max_positions=1024).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SSM_FAMILIES = ("mamba", "mamba2", "bamba")


def build_ssm(family: str, vocab: int = VOCAB, seed: int = 0, *, n_groups: int = 2, bias: bool = False,
              layers: int = 2) -> torch.nn.Module:
    """Tiny random state-space models: Mamba-1, Mamba-2 (8 heads x 16, `n_groups` B/C groups) and a Bamba
    hybrid (layer 0 Mamba-2, layer 1 attention). `bias`: linear biases in the mixers (for compensation)."""
    from transformers import (
        BambaConfig,
        BambaForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "mamba":
        model = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=HIDDEN, state_size=8, expand=2,
                                             num_hidden_layers=layers, time_step_rank=8, use_bias=bias))
    elif family == "falcon_mamba":
        from transformers import FalconMambaConfig, FalconMambaForCausalLM

        model = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=vocab, hidden_size=HIDDEN, state_size=8, expand=2,
                                                         num_hidden_layers=layers, time_step_rank=8, use_bias=bias))
    elif family == "mamba2":
        model = Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=HIDDEN, num_heads=8, head_dim=16, expand=2,
                                               n_groups=n_groups, state_size=8, num_hidden_layers=layers,
                                               chunk_size=16, use_bias=bias))
    elif family == "bamba":
        model = BambaForCausalLM(BambaConfig(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16,
            mamba_n_groups=n_groups, mamba_d_state=8, mamba_chunk_size=16, max_position_embeddings=512,
            mamba_proj_bias=bias))
    else:
        raise ValueError(family)
    with torch.no_grad():  # break the symmetric initialisation (A_log, D, dt) so every head and state differs
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias")) or "conv1d" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()
