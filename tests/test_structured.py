"""Structured pruning: exact budgets, valid GQA, floors, bias compensation, smaller saved models that
reload with identical logits, SEAP's schedule, and one clear line for every bad input."""

from __future__ import annotations

import copy
import itertools
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit
from prunekit.errors import PrunekitError
from prunekit.methods import build_method
from prunekit.structured import apply_plan, count_parameters, get_structure, save_outputs
from prunekit.structured.search import logistic_ratios
from tiny import WORDS, build, random_ids, run

STRUCTURES = ("UL-UM", "UL-MM", "AL-MM", "AL-AM")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def deep_llama(layers: int = 6, heads: int = 6, kv: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv,
                                        max_position_embeddings=128)).eval()


def largest_unit(model) -> int:
    """Parameters of the biggest removable piece (one query head per KV group, a KV group, a channel)."""
    structure = get_structure(model)
    sizes = []
    for block in structure.blocks():
        layout = structure.layout(block)
        sizes += [layout.kv_heads * layout.q_params, layout.group_size * layout.q_params + layout.kv_params,
                  layout.channel_params]
    return max(sizes)


def check_valid(model) -> None:
    """Every layer: equal query heads per KV head, nothing emptied, and the model still runs."""
    structure = get_structure(model)
    for block in structure.blocks():
        layout = structure.layout(block)
        attn = structure.attention(block)
        assert layout.heads >= 1 and layout.kv_heads >= 1 and layout.channels >= 1
        assert layout.heads % layout.kv_heads == 0
        assert attn.num_key_value_groups == layout.heads // layout.kv_heads
    ids = random_ids(1, 8, vocab=model.config.vocab_size)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    model.generate(ids, max_new_tokens=3, do_sample=False)


# -- tiny models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_removed_fraction_is_the_target_within_one_unit(family, structure):
    model = build(family)
    total = sum(get_structure(model).layout(b).total_params for b in get_structure(model).blocks())
    unit = largest_unit(model)
    report = prunekit.prune(model, method="flap", sparsity=0.3, calibration=random_ids(8, 32), batch_size=4,
                            method_options={"structure": structure}, progress=False)
    assert abs(report.overall_sparsity - 0.3) * total <= unit
    assert report.params_after < report.params_before
    check_valid(model)


@pytest.mark.parametrize("gqa", ["query-heads", "kv-groups"])
def test_gqa_rules_keep_groups_valid(gqa):
    model = deep_llama(heads=6, kv=2)
    report = prunekit.prune(model, method="flap", sparsity=0.6, calibration=random_ids(8, 32), batch_size=4,
                            method_options={"gqa": gqa, "structure": "UL-UM"}, progress=False)
    structure = get_structure(model)
    for block, layer in zip(structure.blocks(), report.plans["model"].layers, strict=True):
        layout = structure.layout(block)
        if gqa == "query-heads":
            assert layout.kv_heads == 2 and layout.heads < 6  # a query head left every group
        else:
            assert layout.kv_heads == 1 and layout.heads == 3  # one whole group left
        assert all(h // 3 in layer.kv_heads for h in layer.heads)
    check_valid(model)


def test_adaptive_search_respects_the_per_layer_floor():
    model = deep_llama()
    prunekit.prune(model, method="flap", sparsity=0.7, calibration=random_ids(8, 32), batch_size=4,
                   method_options={"structure": "AL-AM", "min_keep": 0.1}, progress=False)
    structure = get_structure(model)
    for block in structure.blocks():
        layout = structure.layout(block)
        assert layout.channels >= 10 and layout.heads >= 2  # ceil(0.1 * 96); one query head per group
    check_valid(model)


def test_baselines_and_magnitude_needs_no_data():
    model = deep_llama()
    report = prunekit.prune(model, method="magnitude-sp", sparsity=0.3, progress=False)
    assert report.calibration is None and abs(report.overall_sparsity - 0.3) < 0.02
    model = deep_llama()
    report = prunekit.prune(model, method="wanda-sp", sparsity=0.3, calibration=random_ids(8, 32), progress=False)
    assert report.method["metric"] == "WIFN" and not report.method["bias_compensation"]
    check_valid(model)


def reference_channel_metric(metric: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """FLAP's reference metrics (CASIA-IVA-Lab/FLAP lib/prune.py) per input channel, in float64 from raw inputs."""
    w, x = weight.double(), x.double()
    if metric == "IFV":
        return x.var(0)
    if metric == "WIFV":
        return x.var(0) * w.square().sum(0)
    if metric in ("WIFN", "wanda-sp"):
        return (w.abs() * x.norm(dim=0)).mean(0)
    return w.norm(dim=0)  # magnitude-sp


def standardized(v: torch.Tensor) -> torch.Tensor:
    return (v - v.mean()) / v.std()


@pytest.fixture(scope="module")
def mha_model_and_inputs():
    """A 3-layer model without GQA (as the reference's LLaMA-1), its statistics and the raw projection inputs."""
    from prunekit.structured import collect_statistics

    model = deep_llama(layers=3, heads=4, kv=4)
    ids = random_ids(8, 32)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [module.register_forward_pre_hook(lambda _m, a, n=name: inputs.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for name, module in model.named_modules()
        if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    stats, _ = collect_statistics(model, get_structure(model), ids, batch_size=4, progress=False)
    return model, stats, {name: torch.cat(v) for name, v in inputs.items()}


@pytest.mark.parametrize("metric", ["IFV", "WIFV", "WIFN"])
def test_flap_scores_match_the_reference(mha_model_and_inputs, metric):
    """Heads: the attention metric squared, standardised over the layer, averaged per head; channels: standardised."""
    model, stats, inputs = mha_model_and_inputs
    structure = get_structure(model)
    attn, mlp = build_method("flap", {"metric": metric}).units(structure, stats)
    for i, block in enumerate(structure.blocks()):
        x_attn, x_mlp = inputs[f"model.layers.{i}.self_attn.o_proj"], inputs[f"model.layers.{i}.mlp.down_proj"]
        heads = standardized(reference_channel_metric(metric, block.self_attn.o_proj.weight, x_attn).square())
        heads = heads.view(4, -1).mean(1)
        torch.testing.assert_close(attn[i].scores.double(), heads.sort().values, rtol=1e-4, atol=1e-5)
        assert [h for unit in attn[i].heads for h in unit] == heads.argsort().tolist()
        channels = standardized(reference_channel_metric(metric, block.mlp.down_proj.weight, x_mlp))
        torch.testing.assert_close(mlp[i].scores.double(), channels.sort().values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda-sp", "magnitude-sp"])
def test_uniform_baselines_rank_as_the_reference(mha_model_and_inputs, method):
    """wanda-sp / magnitude-sp: a head's rank is the rank of the sum of its raw channel scores (reference)."""
    model, stats, inputs = mha_model_and_inputs
    structure = get_structure(model)
    attn, mlp = build_method(method).units(structure, stats)
    for i, block in enumerate(structure.blocks()):
        x_attn, x_mlp = inputs[f"model.layers.{i}.self_attn.o_proj"], inputs[f"model.layers.{i}.mlp.down_proj"]
        heads = reference_channel_metric(method, block.self_attn.o_proj.weight, x_attn).view(4, -1).sum(1)
        assert [h for unit in attn[i].heads for h in unit] == heads.argsort().tolist()
        channels = reference_channel_metric(method, block.mlp.down_proj.weight, x_mlp)
        assert mlp[i].channels == channels.argsort().tolist()


def test_logistic_schedule_hits_the_target_and_protects_the_ends():
    model = deep_llama(layers=8)
    structure = get_structure(model)
    plan = build_method("seap", {"tasks": {"a": "x"}}).plan(structure, _random_stats(model), 0.3)
    ratios = plan.info["layer_ratios"]
    assert ratios[0] == 0 and ratios[-1] == 0
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(ratios[1:-1]))  # deeper: pruned more
    assert plan.layers[0].removed_params == 0 and plan.layers[-1].removed_params == 0
    channel = structure.layout(structure.blocks()[0]).channel_params
    assert abs(plan.removed_params - 0.3 * plan.total_params) <= channel
    assert logistic_ratios(5, 1.0, 4.0, 0.5, 2, 0.9) == [0.0, 0.0, 0.5, 0.0, 0.0]


def _random_stats(model):
    from prunekit.structured import collect_statistics

    stats, _ = collect_statistics(model, get_structure(model), random_ids(4, 16), batch_size=4, progress=False)
    return stats


def test_seap_task_masks_and_general_mask(tmp_path):
    model = deep_llama()
    rng = random.Random(0)
    tokenizer = make_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    tasks = {}
    for name in ("news", "fiction"):
        path = tmp_path / f"{name}.txt"
        path.write_text(" ".join(rng.choice(WORDS[: 20 if name == "news" else 60]) for _ in range(2000)))
        tasks[name] = str(path)
    report = prunekit.prune(model, method="seap", sparsity=0.3, tokenizer=tokenizer, nsamples=4, seqlen=32,
                            method_options={"tasks": tasks}, progress=False)
    assert set(report.plans) == {"news", "fiction", "general"} and report.applied == "general"
    assert report.plans["news"].layers[2].channels != report.plans["fiction"].layers[2].channels
    paths = save_outputs(report, model, tokenizer, tmp_path / "out", report.to_dict())
    assert sorted(p.name for p in paths) == ["fiction", "general", "news"]
    news = prunekit.load(tmp_path / "out" / "news").model
    assert count_parameters(news) < report.params_before
    check_valid(news)


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,sparsity,needle", [
    ({"structure": "UL-UM"}, 0.97, "would empty"),
    ({"structure": "AL-AM"}, 0.99, "would empty"),
    ({"structure": "XL-AM"}, 0.3, "structure"),
    ({"metric": "FOO"}, 0.3, "metric"),
])
def test_bad_structure_metric_or_ratio(options, sparsity, needle):
    with pytest.raises(PrunekitError) as info:
        prunekit.prune(deep_llama(), method="flap", sparsity=sparsity, calibration=random_ids(4, 16),
                       method_options=options, progress=False)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt_neox"])
def test_family_without_structured_adapter(family):
    with pytest.raises(PrunekitError, match="no structured adapter"):
        prunekit.prune(build(family), method="flap", sparsity=0.3, calibration=random_ids(4, 16), progress=False)


def test_bad_task_sources(tmp_path):
    tokenizer = make_tokenizer()
    short = tmp_path / "short.txt"
    short.write_text("the of and")
    cases = [({}, "at least one task"), ({"a": str(tmp_path / "missing.txt")}, "task 'a'"),
             ({"a": str(short)}, "shorter than one window")]
    for tasks, needle in cases:
        with pytest.raises(PrunekitError, match=needle):
            prunekit.prune(deep_llama(), method="seap", sparsity=0.3, tokenizer=tokenizer, nsamples=2, seqlen=32,
                           method_options={"tasks": tasks}, progress=False)


# -- command line ---------------------------------------------------------------------------------------


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator([" ".join(rng.choice(WORDS) for _ in range(50)) for _ in range(40)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("structured")
    tokenizer = make_tokenizer()
    model = deep_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(1)
    text = root / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(4)))
    return root / "model", text


def test_cli_prune_structured_then_eval(capsys, tiny_folder, tmp_path):
    model, text = tiny_folder
    code, out, err = run(capsys, "prune", model, "--method", "flap", "--sparsity", "0.3", "--structure", "al-am",
                         "--metric", "WIFV", "--calib", text, "--nsamples", "4", "--seqlen", "32",
                         "--out", tmp_path / "flap")
    assert code == 0, err
    loaded = prunekit.load(tmp_path / "flap")
    assert count_parameters(loaded.model) < count_parameters(deep_llama())
    code, out, err = run(capsys, "eval", tmp_path / "flap", "--ppl", text, "--seqlen", "32")
    assert code == 0, err
    assert "perplexity" in out


def test_cli_seap_saves_one_model_per_task(capsys, tiny_folder, tmp_path):
    model, text = tiny_folder
    code, _out, err = run(capsys, "prune", model, "--method", "seap", "--sparsity", "0.3", "--task", f"a={text}",
                          "--task", f"b={text}", "--nsamples", "2", "--seqlen", "32", "--out", tmp_path / "seap")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "seap").iterdir() if p.is_dir()) == ["a", "b", "general"]


@pytest.mark.parametrize("extra,needle", [
    (["--method", "flap", "--structure", "XL"], "structure"),
    (["--method", "flap", "--metric", "FOO"], "metric"),
    (["--method", "seap", "--task", "nosource"], "NAME=SOURCE"),
    (["--method", "seap"], "at least one task"),
    (["--method", "flap", "--sparsity", "0.97", "--structure", "UL-UM"], "would empty"),
])
def test_cli_bad_structured_input(capsys, tiny_folder, tmp_path, extra, needle):
    model, text = tiny_folder
    args = ["prune", model, "--calib", text, "--nsamples", "2", "--seqlen", "32", "--out", tmp_path / "x", *extra]
    code, _out, err = run(capsys, *args)
    last = err.strip().splitlines()[-1]  # a bad ratio is only known once the model's shapes are (progress above)
    assert code == 2
    assert last.startswith("error: ") and needle in last and "Traceback" not in err


# -- the real SmolLM2 (9 query heads over 3 KV heads) ------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_stats(smollm2_loaded, sotu):
    from prunekit.data import build_calibration
    from prunekit.structured import collect_statistics

    calib = build_calibration(str(sotu / "train.txt"), smollm2_loaded.tokenizer, nsamples=16, seqlen=128, seed=0)
    stats, _ = collect_statistics(smollm2_loaded.model, get_structure(smollm2_loaded.model), calib.input_ids,
                                  batch_size=16, progress=False)
    return stats


@pytest.fixture(scope="module")
def smollm2_flap(smollm2_loaded, smollm2_stats, tmp_path_factory):
    """FLAP (WIFV, AL-AM) at 30 % on a copy of SmolLM2, saved to a folder."""
    model = copy.deepcopy(smollm2_loaded.model)
    structure = get_structure(model)
    plan = build_method("flap").plan(structure, smollm2_stats, 0.3)
    apply_plan(model, structure, plan)
    folder = tmp_path_factory.mktemp("flap") / "smollm2-flap-30"
    from prunekit.export import save_model

    save_model(model, smollm2_loaded.tokenizer, folder, {"test": True})
    return model, plan, folder


@pytest.mark.real_model
def test_real_exact_fraction_gqa_and_smaller_files(smollm2_loaded, smollm2_flap):
    model, plan, folder = smollm2_flap
    dense = smollm2_loaded.model
    assert abs(plan.removed_params - 0.3 * plan.total_params) <= largest_unit(dense)
    structure = get_structure(model)
    for block in structure.blocks():
        layout = structure.layout(block)
        assert layout.kv_heads == 3 and layout.heads in (3, 6, 9) and layout.channels >= 1
    added_biases = sum(int(layer.o_bias is not None) + int(layer.down_bias is not None) for layer in plan.layers)
    expected = count_parameters(dense) - plan.removed_params + added_biases * dense.config.hidden_size
    assert count_parameters(model) == expected
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size < 4 * count_parameters(model) * 1.01 < 4 * count_parameters(dense) * 0.85


@pytest.mark.real_model
def test_real_reload_gives_identical_logits(smollm2_loaded, smollm2_flap):
    model, _plan, folder = smollm2_flap
    from prunekit.models import load_model

    ids = smollm2_loaded.tokenizer("The state of our union is", return_tensors="pt").input_ids
    for loaded in (prunekit.load(folder), load_model(folder)):  # load_model is what `prunekit eval` uses
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded.model(ids).logits)


@pytest.mark.real_model
def test_real_bias_compensation_reduces_output_error(smollm2_loaded, smollm2_stats, sotu):
    """On held-out real text, W[:, R]·x_R (what removal loses) is better replaced by W[:, R]·mean than by 0."""
    from prunekit.data import build_calibration

    dense = smollm2_loaded.model
    plan = build_method("flap", {"structure": "UL-UM"}).plan(get_structure(dense), smollm2_stats, 0.3)
    held_out = build_calibration(str(sotu / "test.txt"), smollm2_loaded.tokenizer, nsamples=4, seqlen=128, seed=1)
    blocks = get_structure(dense).blocks()
    inputs: dict[str, torch.Tensor] = {}
    layers = (3, 15, 27)
    hooks = []
    for i in layers:
        hooks.append(blocks[i].self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a, i=i: inputs.__setitem__(f"o{i}", a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(blocks[i].mlp.down_proj.register_forward_pre_hook(
            lambda _m, a, i=i: inputs.__setitem__(f"d{i}", a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        dense(held_out.input_ids)
    for hook in hooks:
        hook.remove()
    from prunekit.structured.shrink import compensation

    for i in layers:
        layer = plan.layers[i]
        layer.o_bias, layer.down_bias = compensation(get_structure(dense), blocks[i], layer)
        head_dim = 64
        kept_cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in layer.heads])
        for key, weight, kept, bias in ((f"o{i}", blocks[i].self_attn.o_proj.weight, kept_cols, layer.o_bias),
                                        (f"d{i}", blocks[i].mlp.down_proj.weight, torch.tensor(layer.channels),
                                         layer.down_bias)):
            removed = torch.ones(weight.shape[1], dtype=torch.bool)
            removed[kept] = False
            lost = inputs[key][:, removed] @ weight[:, removed].t()
            plain = lost.square().sum()
            compensated = (lost - bias).square().sum()
            assert compensated < plain, (key, float(compensated), float(plain))
