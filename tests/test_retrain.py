"""PERP retraining (`prunekit retrain`): the adapters against naive loops, masks that survive the merge
weight by weight, the parameter counts, reloading (stock, structured, peft), resume to the same bytes, and a
one-line error for each bad input."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prunekit
from prunekit.export import save_model
from prunekit.retrain.lora import LowRank
from tiny import WORDS, assert_one_line_error, build, make_tokenizer, run

FAST = {"steps": 4, "batch_size": 2, "seqlen": 32, "lr": 5e-2, "progress": False}


def _text(path: Path, docs: int, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(docs)))
    return path


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Tiny llamas saved as prunekit outputs: dense, magnitude 50 % (tied head), 2:4, magnitude-sp 30 %;
    training and held-out text."""
    root = tmp_path_factory.mktemp("retrain")
    tokenizer = make_tokenizer()
    folders = {}
    for name, options in {"dense": None, "unstructured": {"sparsity": 0.5}, "2:4": {"sparsity": 0.5, "pattern": "2:4"},
                          "structured": {"method": "magnitude-sp", "sparsity": 0.3}}.items():
        model = build("llama", vocab=len(tokenizer), max_positions=1024)
        if name == "unstructured":  # a tied head and embedding, like SmolLM2
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        manifest = {"note": "dense"}
        if options:
            report = prunekit.prune(model, method=options.pop("method", "magnitude"), progress=False, **options)
            manifest = {"overall_sparsity": report.overall_sparsity, "method": report.method}
        folders[name] = save_model(model, tokenizer, root / name, manifest)
    return {"root": root, **folders, "train": _text(root / "train.txt", 20, 300, 0),
            "test": _text(root / "test.txt", 4, 300, 1), "short": _text(root / "short.txt", 1, 100, 2)}


def _linears(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# -- the adapters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "mask_lora", "scale_lora"])
def test_adapter_matches_naive_formula(kind):
    torch.manual_seed(0)
    weight = torch.randn(5, 7)
    weight[torch.rand(5, 7) < 0.5] = 0
    adapter = LowRank(weight, rank=3, alpha=6.0, kind=kind)
    with torch.no_grad():
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    got = adapter(weight).double()
    a, b, w = adapter.lora_A.detach().double(), adapter.lora_B.detach().double(), weight.double()
    expected = torch.empty(5, 7, dtype=torch.float64)
    for i in range(5):
        for j in range(7):
            product = sum(float(b[i, k] * a[k, j]) for k in range(3))
            if kind == "scale_lora":
                expected[i, j] = w[i, j] * product
            elif kind == "mask_lora":
                expected[i, j] = w[i, j] + (6.0 / 3) * product * (1.0 if w[i, j] != 0 else 0.0)
            else:
                expected[i, j] = w[i, j] + (6.0 / 3) * product
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapters_start_as_the_identity():
    weight = torch.randn(6, 4)
    for kind in ("lora", "mask_lora", "scale_lora"):
        torch.testing.assert_close(LowRank(weight, 2, 4.0, kind)(weight), weight)


# -- masks survive the merge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("kind", ["mask_lora", "scale_lora"])
def test_merged_model_has_exactly_the_input_mask(material, tmp_path, pattern, kind):
    out = tmp_path / "out"
    report = prunekit.retrain(material[pattern], out, calib=str(material["train"]), lora_kind=kind, **FAST)
    before, after = _linears(_weights(material[pattern])), _linears(_weights(out))
    assert set(before) == set(after) and len(after) == 14
    changed = 0
    for name, weight in before.items():
        assert torch.equal(weight == 0, after[name] == 0), name  # weight by weight
        changed += int((weight != after[name]).sum())
        if pattern == "2:4":  # naive: every group of four inputs keeps exactly two
            rows = after[name].tolist()
            for row in rows:
                for start in range(0, len(row), 4):
                    assert sum(1 for x in row[start : start + 4] if x == 0) == 2
    assert changed > 0  # the adapters were trained and merged, not dropped
    assert report.record["mask"]["kept"] and report.record["mask"]["zero_fraction_after"] == 0.5
    tied = prunekit.load(str(out)).model
    if pattern == "unstructured":  # the head update stays tied to the embedding
        assert tied.lm_head.weight is tied.model.embed_tokens.weight
        assert not torch.equal(tied.lm_head.weight, _weights(material[pattern])["model.embed_tokens.weight"])


def test_plain_lora_is_kept_apart_as_a_peft_adapter_or_merged_with_a_warning(material, tmp_path):
    from peft import PeftModel

    kept = prunekit.retrain(material["unstructured"], tmp_path / "kept", calib=str(material["train"]),
                            lora_kind="lora", **FAST)
    assert kept.record["parameters"]["lora"]["merged"] is False and kept.record["mask"]["kept"]
    assert (tmp_path / "kept" / "adapter" / "adapter_config.json").is_file()
    with pytest.warns(UserWarning, match="fills the pruned weights"):
        merged = prunekit.retrain(material["unstructured"], tmp_path / "merged", calib=str(material["train"]),
                                  lora_kind="lora", merge_lora=True, **FAST)
    assert not merged.record["mask"]["kept"] and merged.record["mask"]["zero_fraction_after"] < 0.5
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    base = prunekit.load(str(tmp_path / "kept")).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "kept" / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, prunekit.load(str(tmp_path / "merged")).model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


# -- parameter groups, reloading, manifest -------------------------------------------------------------------


def test_trainable_fraction_and_added_biases_reload_with_stock_transformers(material, tmp_path):
    from transformers import AutoModelForCausalLM

    report = prunekit.retrain(material["2:4"], tmp_path / "out", calib=str(material["train"]),
                              params="bias,norm", **FAST)
    # by hand: 2 layers x (q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64) biases; 2 x 2 + 1 norms of 64
    trainable = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64) + 5 * 64
    dense = build("llama", vocab=len(make_tokenizer()), max_positions=1024)
    total = sum(p.numel() for p in dense.parameters())
    params = report.record["parameters"]
    assert params["trainable"] == trainable and params["model"] == total
    assert params["trainable_fraction"] == pytest.approx(trainable / total)
    assert params["biases"] == {"trained": 14, "added": 14, "not_storable": []}
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ours = prunekit.load(str(tmp_path / "out")).model
    assert stock.config.attention_bias and stock.config.mlp_bias
    assert float(stock.model.layers[0].mlp.down_proj.bias.abs().sum()) > 0
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, ours(ids).logits)


def test_structured_model_retrains_with_its_shapes_and_reloads(material, tmp_path):
    before = prunekit.load(str(material["structured"])).model
    report = prunekit.retrain(material["structured"], tmp_path / "out", calib=str(material["train"]),
                              params="bias,norm,lora", lora_kind="lora", lora_rank=4, **FAST)
    assert report.record["parameters"]["lora"]["merged"]  # no mask to break: merged without a warning
    after = prunekit.load(str(tmp_path / "out")).model
    shapes = {n: p.shape for n, p in before.named_parameters()}
    for name, parameter in after.named_parameters():
        if name.endswith("proj.weight"):
            assert parameter.shape == shapes[name]
            assert not torch.equal(parameter, before.get_parameter(name))
        if name.endswith("proj.bias") and name not in shapes:  # added by PERP, recorded in the structure
            assert float(parameter.abs().sum()) > 0
    spec = json.loads((tmp_path / "out" / "config.json").read_text())["prunekit_structure"]
    assert all(len(layer["bias"]) == 7 for layer in spec["layers"])


def test_manifest_keeps_the_pruning_record_and_adds_retraining(material, tmp_path, capsys):
    code, out, err = run(capsys, "retrain", material["unstructured"], "--out", tmp_path / "out", "--calib",
                         material["train"], "--params", "bias,norm,head", "--steps", "3", "--batch-size", "2",
                         "--seqlen", "32", "--ppl", material["test"], "--ppl-seqlen", "32")
    assert code == 0, err
    assert "perplexity" in out and "trained" in out
    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["overall_sparsity"] == 0.5 and manifest["method"]["name"] == "magnitude"
    record = manifest["retraining"]
    assert record["parameters"]["sets"] == ["bias", "norm", "head"] and len(record["loss_curve"]) == 3
    assert record["data"]["source"] == str(material["train"]) and len(record["data"]["offsets"]) == 6
    assert record["evaluation"]["after"]["source"]["source"] == str(material["test"])
    assert not (tmp_path / ".out.partial").exists()


# -- modes and resume ------------------------------------------------------------------------------------------


def test_reconstruct_fits_each_block_to_the_dense_one(material, tmp_path):
    report = prunekit.retrain(material["unstructured"], tmp_path / "out", calib=str(material["train"]),
                              mode="reconstruct", reference=str(material["dense"]), nsamples=4,
                              **{**FAST, "steps": 12, "lr": 1e-2})
    curves = report.record["block_loss_curves"]
    assert len(curves) == 2 and all(len(c) == 12 for c in curves)
    assert all(sum(c[-4:]) < sum(c[:4]) for c in curves)  # the same 2 batches cycled: the error falls
    assert report.record["parameters"]["head"] == "skipped: reconstruct mode fits blocks only"


@pytest.mark.parametrize("mode", ["retrain", "reconstruct"])
def test_resume_ends_with_identical_bytes(material, tmp_path, monkeypatch, mode):
    settings = {**FAST, "steps": 6, "save_every": 2, "mode": mode, "nsamples": 4,
                "reference": str(material["dense"]) if mode == "reconstruct" else None}
    prunekit.retrain(material["unstructured"], tmp_path / "whole", calib=str(material["train"]), **settings)
    # retrain: after the checkpoint of step 4; reconstruct: inside block 2 (block 1 is checkpointed)
    crash_at, calls = (5 if mode == "retrain" else 9), {"n": 0}
    real_step = torch.optim.AdamW.step

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise RuntimeError("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(RuntimeError, match="killed"):
        prunekit.retrain(material["unstructured"], tmp_path / "resumed", calib=str(material["train"]), **settings)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / ".resumed.partial" / "checkpoint" / "state.json").is_file()
    report = prunekit.retrain(material["unstructured"], tmp_path / "resumed", calib=str(material["train"]),
                              resume=True, **settings)
    assert report.record["resumed_at_step"] == (4 if mode == "retrain" else 1)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == whole


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("label", "folder", "extra", "needle"), [
    ("no manifest", "root", [], "not a prunekit output"),
    ("mask_lora on dense", "dense", ["--lora-kind", "mask_lora"], "mask_lora needs pruned weights"),
    ("unknown set", "unstructured", ["--params", "bias,gates"], "unknown parameter set 'gates'"),
    ("unknown kind", "unstructured", ["--lora-kind", "dora"], "lora_kind"),
    ("rank too large", "unstructured", ["--lora-rank", "100"], "LoRA rank 100 is larger than layer"),
    ("reconstruct without reference", "unstructured", ["--mode", "reconstruct"], "needs --reference"),
    ("short text", "unstructured", ["--calib-short"], "shorter than one batch"),
    ("eval on training text", "unstructured", ["--ppl-train"], "is the training text"),
    ("zero steps", "unstructured", ["--steps", "0"], "retrain steps"),
])
def test_bad_input_is_one_line(material, tmp_path, capsys, label, folder, extra, needle):
    calib = material["short"] if "--calib-short" in extra else material["train"]
    extra = [x for x in extra if x != "--calib-short"]
    if "--ppl-train" in extra:
        extra = ["--ppl", str(material["train"])]
    code, _out, err = run(capsys, "retrain", material[folder], "--out", tmp_path / "out", "--calib", calib,
                          "--batch-size", "4", "--seqlen", "64", "--steps", "2", *extra)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_interrupted_run_needs_resume(material, tmp_path, capsys):
    (tmp_path / ".out.partial").mkdir()
    code, _out, err = run(capsys, "retrain", material["unstructured"], "--out", tmp_path / "out", "--calib",
                          material["train"])
    assert_one_line_error(code, err, "pass --resume")


@pytest.mark.parametrize(("family", "added", "not_storable"), [
    ("qwen2", 0, 8),     # q/k/v have biases already; no switch gives o_proj or the MLP one
    ("gemma3", 12, 9),   # attention_bias switches on q/k/v/o of 3 layers; the MLP has no switch
    ("opt", 0, 0), ("gpt2", 0, 0), ("gpt_neox", 0, 0),  # biases everywhere already
])
def test_every_family_retrains_keeps_its_mask_and_reloads(material, tmp_path, family, added, not_storable):
    model = build(family, vocab=len(make_tokenizer()), max_positions=1024)
    prunekit.prune(model, method="magnitude", sparsity=0.5, progress=False)
    save_model(model, make_tokenizer(), tmp_path / "in", {"pruned": True})
    report = prunekit.retrain(tmp_path / "in", tmp_path / "out", calib=str(material["train"]),
                              lora_kind="scale_lora", **{**FAST, "steps": 2})
    biases = report.record["parameters"]["biases"]
    assert (biases["added"], len(biases["not_storable"])) == (added, not_storable)
    assert report.record["mask"]["kept"]
    reloaded = prunekit.load(str(tmp_path / "out")).model.state_dict()
    biases = {name: saved for name, saved in _weights(tmp_path / "out").items() if name.endswith(".bias")}
    assert biases and all(torch.equal(reloaded[name], saved) for name, saved in biases.items())  # none dropped
