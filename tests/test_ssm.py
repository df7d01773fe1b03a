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
         "falcon_mamba": ("mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"),
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


@pytest.mark.parametrize("family", ["mamba", "bamba"])
@pytest.mark.parametrize("method", ["ria", "alps"])
def test_second_generation_methods_on_ssm_linears(family, method):
    model = build_ssm(family)
    report = prunekit.prune(model, method=method, sparsity=0.5, calibration=random_ids(4, 32), progress=False,
                            method_options={"ssm_parts": "all"})
    assert report.overall_sparsity == pytest.approx(0.5, abs=1e-9)
    for record in report.engine.layers:
        assert int((model.get_submodule(record.name).weight == 0).sum()) == record.pruned == record.numel // 2


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


@pytest.mark.parametrize("family", [*SSM_FAMILIES, "falcon_mamba"])
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


# -- structured --------------------------------------------------------------------------------------------


def _mixer(family: str, block):
    if family == "bamba":
        return block.mamba if block.block_type == "linear_attention" else None
    return block.mixer


@torch.no_grad()
def _masked(dense, family: str, plan):
    """The dense model with what the plan removes zeroed (and merged B/C groups averaged), written out."""
    model = copy.deepcopy(dense)
    for block, layer in zip(_blocks(model), plan.layers, strict=True):
        mixer = _mixer(family, block)
        if layer is None:
            continue
        w, cw = mixer.in_proj.weight, mixer.conv1d.weight
        cb = mixer.conv1d.bias
        if family == "mamba":
            inner, n, rank = mixer.in_proj.out_features // 2, mixer.A_log.shape[1], mixer.dt_proj.in_features
            groups = 1
        else:
            inner, n, groups = mixer.out_proj.in_features, mixer.ssm_state_size, mixer.n_groups
        for c in set(range(inner)) - set(layer.channels):
            w[c] = 0
            w[inner + c] = 0
            cw[c] = 0
            if cb is not None:
                cb[c] = 0
            if mixer.in_proj.bias is not None:
                mixer.in_proj.bias[c] = 0
                mixer.in_proj.bias[inner + c] = 0
        for g in range(groups):
            for s in set(range(n)) - set(layer.states[g]):
                if family == "mamba":
                    mixer.x_proj.weight[rank + s] = 0
                    mixer.x_proj.weight[rank + n + s] = 0
                    continue
                for row, channel in ((2 * inner + g * n + s, inner + g * n + s),
                                     (2 * inner + (groups + g) * n + s, inner + (groups + g) * n + s)):
                    w[row] = 0
                    cw[channel] = 0
                    if cb is not None:
                        cb[channel] = 0
        if layer.merge > 1:
            for part in range(2):  # B, then C
                for first in range(0, groups, layer.merge):
                    rows = [2 * inner + (part * groups + g) * n + s for g in range(first, first + layer.merge)
                            for s in range(n)]
                    channels = [r - inner for r in rows]
                    for tensor, index in ((w, rows), (cw, channels), (cb, channels)):
                        if tensor is None:
                            continue
                        block_ = tensor[index].reshape(layer.merge, n, *tensor.shape[1:])
                        tensor[index] = block_.mean(0).repeat(layer.merge, *([1] * (tensor.dim() - 1)))
    return model


STRUCTURED = [("ssm-state", 0.25), ("ssm-headdim", 0.25), ("ssm-headmerge", 0.5), ("flap", 0.25)]


@pytest.mark.parametrize("family", SSM_FAMILIES)
@pytest.mark.parametrize("method,ratio", STRUCTURED)
def test_shrunk_logits_equal_the_masked_dense_model(family, method, ratio):
    if family == "mamba" and method == "ssm-headmerge":
        pytest.skip("Mamba-1 has one B/C head")
    dense = build_ssm(family)
    model = copy.deepcopy(dense)
    ids = random_ids(4, 32)
    options = {"compensate": False} if method == "flap" else {}
    report = prunekit.prune(model, method=method, sparsity=ratio, calibration=ids, progress=False,
                            method_options=options)
    plan = report.plans["model"]
    assert report.params_after == report.params_before - plan.removed_params
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert 0 < plan.achieved < 1
    masked = _masked(dense, family, plan)
    torch.testing.assert_close(_logits(model, ids), _logits(masked, ids), rtol=1e-4, atol=2e-5)
    for block, layer in zip(_blocks(model), plan.layers, strict=True):
        if layer is None:
            continue
        mixer = _mixer(family, block)
        if method == "ssm-state":
            assert mixer.ssm_state_size == 6 and all(len(s) == 6 for s in layer.states)
        elif method == "ssm-headdim":
            assert mixer.out_proj.in_features == 96
        elif method == "ssm-headmerge":
            assert mixer.n_groups == 1
        else:
            assert mixer.out_proj.in_features < 128


def test_ssm_flap_compensates_into_an_existing_bias():
    dense = build_ssm("mamba2", bias=True)
    model = copy.deepcopy(dense)
    ids = random_ids(4, 32)
    report = prunekit.prune(model, method="flap", sparsity=0.25, calibration=ids, progress=False,
                            method_options={"structure": "UL-UM"})
    means = []  # out_proj's input mean over the calibration tokens of the dense model, by hand
    handles = [block.mixer.out_proj.register_forward_pre_hook(
        lambda _m, inputs: means.append(inputs[0].reshape(-1, inputs[0].shape[-1]).double().mean(0)))
        for block in dense.backbone.layers]
    _logits(dense, ids)
    for handle in handles:
        handle.remove()
    for block, dense_block, layer, mean in zip(model.backbone.layers, dense.backbone.layers,
                                               report.plans["model"].layers, means, strict=True):
        removed = sorted(set(range(128)) - set(layer.channels))
        assert len(layer.heads) == 6  # UL: 25 % of 8 heads, one per B/C group
        weight = dense_block.mixer.out_proj.weight.double()
        expected = dense_block.mixer.out_proj.bias.double() + weight[:, removed] @ mean[removed]
        torch.testing.assert_close(block.mixer.out_proj.bias.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,method,ratio", [("mamba2", "flap", 0.25), ("bamba", "ssm-state", 0.25),
                                                 ("mamba", "ssm-headdim", 0.25)])
def test_structured_streamed_saves_a_smaller_model_that_reloads(capsys, tmp_path, calib, family, method, ratio):
    folder = _save(tmp_path / "model", family)
    for name, extra in (("s", ()), ("m", ("--no-stream",))):
        code, _, err = run(capsys, *_prune_args(folder, tmp_path / name, calib, "--method", method,
                                                "--sparsity", str(ratio), *extra))
        assert code == 0, err
    ids = torch.randint(0, 200, (2, 24))
    streamed, in_memory = prunekit.load(tmp_path / "s").model, prunekit.load(tmp_path / "m").model
    torch.testing.assert_close(_logits(streamed, ids), _logits(in_memory, ids), rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "s" / "prunekit.json").read_text())
    params = sum(p.numel() for p in streamed.parameters())
    assert manifest["structured"]["params_after"] == params < manifest["structured"]["params_before"]
    size = sum(p.stat().st_size for p in (tmp_path / "s").glob("*.safetensors"))
    assert size < sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_structured_bad_input(capsys, tmp_path, calib):
    folder = _save(tmp_path / "model", "mamba2")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "o", calib, "--method", "ssm-state",
                                            "--sparsity", "0.95"))
    assert_one_line_error(code, err, "ssm-state at 0.95 would remove all 8 SSM states of layer 0")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "o", calib, "--method", "flap", "--sparsity", "0.95",
                                            "--option", "structure=UL-UM"))
    assert_one_line_error(code, err, "would remove all 4 head units of layer 0")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "o", calib, "--method", "wanda-sp"))
    assert_one_line_error(code, err, "method wanda-sp does not apply to state-space (SSM) layers of mamba2; "
                                     "structured methods that do: flap, ssm-headdim, ssm-headmerge, ssm-state")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "o", calib, "--method", "ssm-headmerge",
                                            "--sparsity", "0.2"))
    assert_one_line_error(code, err, "accepted ratios: 0.5")
    code, _, err = run(capsys, *_prune_args(folder, tmp_path / "o", calib, "--method", "flap", "--option",
                                            "ssm_parts=all"))
    assert_one_line_error(code, err, "structured method flap removes whole states, channels or heads")
    with pytest.raises(PrunekitError, match="method ssm-headdim prunes state-space"):
        prunekit.prune(build("llama"), method="ssm-headdim", sparsity=0.2, calibration=random_ids(2, 16),
                       progress=False)
    assert not (tmp_path / "o").exists()
