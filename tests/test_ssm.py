"""State-space models (Mamba, Mamba-2, the Bamba hybrid): unstructured pruning of the SSM linears through the
ordinary engine, and the structured SSM methods (state, head dimension, head merging, SSM-FLAP) that save a
physically smaller model. Tiny random models; every expectation is computed independently."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.errors import PrunekitError
from tiny import SSM_FAMILIES, WORDS, assert_one_line_error, build, build_ssm, make_tokenizer, random_ids, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the SSM linears of each family, relative to a block
PARTS = {"mamba": ("mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"),
         "mamba2": ("mixer.in_proj", "mixer.out_proj"), "bamba": ("mamba.in_proj", "mamba.out_proj")}
BAMBA_DENSE = ("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj")
BAMBA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", *BAMBA_DENSE)


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.backbone.layers


def _prefix(model):
    return "model.layers" if hasattr(model, "model") else "backbone.layers"


def _linears(family: str, block) -> tuple[str, ...]:
    if family != "bamba":
        return PARTS[family]
    return (*PARTS["bamba"], *BAMBA_DENSE) if block.block_type == "linear_attention" else BAMBA_ATTN


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# -- unstructured ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SSM_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_on_the_chosen_parts(family, method):
    model = build_ssm(family)
    dense = copy.deepcopy(model)
    report = prunekit.prune(model, method=method, sparsity=0.5, calibration=random_ids(4, 32), progress=False,
                            method_options={"ssm_parts": "all"})
    expected = {f"{_prefix(model)}.{i}.{name}" for i, block in enumerate(_blocks(model))
                for name in _linears(family, block)}
    assert {r.name for r in report.engine.layers} == expected
    for record in report.engine.layers:
        weight = model.get_submodule(record.name).weight
        assert int((weight == 0).sum()) == record.pruned
        if method != "sparsegpt":  # per-row (Wanda) and layer-wide (magnitude) counts agree at 50 % of even widths
            assert record.pruned == record.numel // 2, record.name
        else:
            assert record.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    assert report.to_dict()["options"]["ssm_parts"] == list(PARTS_NAMES[family])
    # the default: in_proj only (the paper's code); the other SSM linears stay dense
    model = copy.deepcopy(dense)
    report = prunekit.prune(model, method=method, sparsity=0.5, calibration=random_ids(4, 32), progress=False)
    names = {r.name.split(".", 3)[3] for r in report.engine.layers}
    assert "mixer.in_proj" in names or "mamba.in_proj" in names
    assert not names & {"mixer.x_proj", "mixer.dt_proj", "mixer.out_proj", "mamba.out_proj"}
    for name, param in model.named_parameters():
        if name.endswith(("out_proj.weight", "x_proj.weight", "dt_proj.weight")):
            assert torch.equal(param, dense.get_parameter(name)), name


PARTS_NAMES = {"mamba": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj"),
               "bamba": ("in_proj", "out_proj")}


def _naive_wanda(model, family: str, ids: torch.Tensor, sparsity: float) -> None:
    """Wanda written out: block by block over the model pruned so far, every linear's input norms from one dense
    forward of its block (Mamba-1's dt_proj reads the first dt_rank columns of x_proj's output), then each row
    loses its int(in x s) lowest |W| x ||X||."""
    for block in _blocks(model):
        names = _linears(family, block)
        norms: dict[str, torch.Tensor] = {}

        def keep(name: str, x: torch.Tensor, norms: dict = norms) -> None:
            x = x.reshape(-1, x.shape[-1]).double()
            norms[name] = norms.get(name, 0) + (x * x).sum(0)

        handles = []
        for name in names:
            module = block.get_submodule(name)
            if name == "mixer.dt_proj":
                rank = module.in_features
                handles.append(block.mixer.x_proj.register_forward_hook(
                    lambda _m, _i, out, name=name, rank=rank: keep(name, out[..., :rank])))
            else:
                handles.append(module.register_forward_pre_hook(lambda _m, inputs, name=name: keep(name, inputs[0])))
        _logits(model, ids)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name in names:
                weight = block.get_submodule(name).weight
                score = weight.abs().double() * norms[name].sqrt()[None, :]
                k = int(weight.shape[1] * sparsity)
                lowest = torch.argsort(score, dim=1)[:, :k]
                weight.scatter_(1, lowest, 0.0)


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_wanda_masks_equal_a_naive_computation(family):
    model = build_ssm(family)
    naive = copy.deepcopy(model)
    ids = random_ids(4, 32)
    prunekit.prune(model, method="wanda", sparsity=0.5, calibration=ids, progress=False,
                   method_options={"ssm_parts": "all"}, batch_size=2)
    _naive_wanda(naive, family, ids, 0.5)
    for name, weight in naive.named_parameters():
        if name.endswith("proj.weight"):
            assert torch.equal(model.get_parameter(name) == 0, weight == 0), name


def test_n_m_where_widths_allow_and_refused_where_not():
    model = build_ssm("mamba")
    prunekit.prune(model, method="wanda", sparsity=0.5, pattern="2:4", calibration=random_ids(4, 32), progress=False,
                   method_options={"ssm_parts": "in_proj,out_proj"})
    for block in model.backbone.layers:
        for linear in (block.mixer.in_proj, block.mixer.out_proj):
            groups = (linear.weight == 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
            assert torch.all(groups == 2)
    with pytest.raises(PrunekitError, match="dt_proj"):  # dt_proj reads 8 inputs: 16:32 cannot fit
        prunekit.prune(build_ssm("mamba"), method="magnitude", pattern="16:32", progress=False,
                       method_options={"ssm_parts": "all"})


def _save(folder, family: str):
    tokenizer = make_tokenizer()
    build_ssm(family, vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("ssm") / "calib.txt"
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    return path


def _prune_args(model, out, calib, *extra):
    return ["prune", str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2",
            "--out", str(out), *extra]


@pytest.mark.parametrize("family", SSM_FAMILIES)
def test_streamed_equals_in_memory_and_reloads_in_stock_transformers(capsys, tmp_path, calib, family):
    folder = _save(tmp_path / "model", family)
    extra = ("--method", "wanda", "--option", "ssm_parts=all")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "s", calib, *extra))
    assert code == 0, err
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "m", calib, *extra, "--no-stream"))
    assert code == 0, err
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    for name, weight in in_memory.state_dict().items():
        assert torch.equal(streamed.state_dict()[name] == 0, weight == 0), name
        torch.testing.assert_close(streamed.state_dict()[name], weight, rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "s" / "prunekit.json").read_text())
    assert manifest["overall_sparsity"] == pytest.approx(0.5, abs=1e-9)
    # the saved model gives the logits of the model pruned in memory through the API
    tokenizer = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer(" ".join(WORDS[:40]))["input_ids"][:32]])
    prunekit.prune(model, method="wanda", sparsity=0.5, calibration=str(calib), tokenizer=tokenizer, nsamples=4,
                   seqlen=32, batch_size=2, progress=False, method_options={"ssm_parts": "all"})
    torch.testing.assert_close(_logits(in_memory, ids), _logits(model, ids), rtol=1e-4, atol=1e-5)


def test_bad_ssm_parts_and_unsupported_layers(capsys, tmp_path, calib):
    folder = _save(tmp_path / "model", "mamba2")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "o", calib, "--option", "ssm_parts=x_proj"))
    assert_one_line_error(code, err, "SSM part 'x_proj' does not exist in mamba2 layers; accepted: in_proj, out_proj")
    with pytest.raises(PrunekitError, match="applies to state-space models; llama has no SSM layers"):
        prunekit.prune(build("llama"), method="magnitude", progress=False, method_options={"ssm_parts": "all"})
    hybrid = build_ssm("bamba")
    hybrid.model.layers[1].block_type = "moe_attention"
    with pytest.raises(PrunekitError, match=r"layer 1 is of type 'moe_attention'.*supported layer types"):
        prunekit.prune(hybrid, method="magnitude", progress=False)
