"""Speed measurement: the compiled decoder produces exactly eager's greedy tokens (also on a model whose
layers have different head counts), speed-ups are relative to the first model, and bad input is one line."""

from __future__ import annotations

import copy
import random
import shutil

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.evaluation.speed import CompiledDecoder, eager_decode, measure_speed
from prunekit.structured import count_parameters, get_structure
from tiny import FAMILIES, WORDS, assert_one_line_error, build, random_ids, run, save_tiny_llama

needs_compiler = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("clang++"),
                                    reason="torch inductor on CPU needs a C++ compiler")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dense_and_flap():
    """A tiny llama and a FLAP copy of it with uneven heads and channels per layer."""
    dense = build("llama", max_positions=512)
    pruned = copy.deepcopy(dense)
    prunekit.prune(pruned, method="flap", sparsity=0.4, calibration=random_ids(8, 32), progress=False,
                   method_options={"structure": "AL-AM"})
    return dense, pruned


def test_flap_model_has_uneven_layers(dense_and_flap):
    dense, pruned = dense_and_flap
    structure = get_structure(pruned)
    sizes = {(structure.layout(b).heads, structure.layout(b).channels) for b in structure.blocks()}
    assert count_parameters(pruned) < count_parameters(dense)
    assert sizes != {(4, 128)}


@needs_compiler
def test_compiled_decoder_matches_eager_greedy_tokens(dense_and_flap):
    prompt = random_ids(1, 12, seed=3)
    for model in dense_and_flap:
        decoder = CompiledDecoder(model)
        compiled = decoder(prompt, 10)
        assert compiled.shape == (1, 10)
        assert torch.equal(compiled, eager_decode(model, prompt, 10))
        assert torch.equal(decoder(prompt, 10), compiled)  # second call reuses the kernels, same answer


@needs_compiler
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_compiled_decoder_on_every_family(family):
    """Including Gemma 3's sliding-window layers, whose static cache counts positions in a Python int."""
    model = build(family, max_positions=512)
    prompt = random_ids(1, 12, seed=4)
    assert torch.equal(CompiledDecoder(model)(prompt, 12), eager_decode(model, prompt, 12))


def test_speedups_are_relative_to_the_first_model(dense_and_flap):
    dense, pruned = dense_and_flap
    report = measure_speed({"dense": dense, "flap": pruned}, random_ids(1, 64), prompt_tokens=8, new_tokens=4,
                           repeats=2, runtimes=("eager",))
    assert report.baseline == "dense"
    base, row = report.models["dense"], report.models["flap"]
    assert base.prefill_speedup == 1.0 and base.decode_speedup == {"eager": 1.0}
    assert row.prefill_speedup == pytest.approx(row.prefill_tok_s / base.prefill_tok_s)
    assert row.decode_speedup["eager"] == pytest.approx(row.decode_tok_s["eager"] / base.decode_tok_s["eager"])
    assert row.parameters == count_parameters(pruned) < base.parameters
    assert len(row.seconds["prefill"]) == len(row.seconds["eager"]) == 2
    assert row.same_tokens_as_eager is None  # only one runtime timed
    assert report.protocol["prefill_tokens"] == 64 and report.protocol["new_tokens"] == 4


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"runtimes": ("jit",)}, "unknown runtime 'jit'; accepted: eager, compiled"),
    ({"runtimes": ()}, "no runtime given"),
    ({"prompt_tokens": 99}, "prompt_tokens=99 must be between 1 and the 64 tokens given"),
    ({"new_tokens": 0}, "new_tokens=0 must be at least 1"),
    ({"repeats": 0}, "repeats=0 must be at least 1"),
])
def test_bad_arguments(dense_and_flap, kwargs, needle):
    with pytest.raises(PrunekitError, match=needle):
        measure_speed({"dense": dense_and_flap[0]}, random_ids(1, 64), **kwargs)


def test_ids_must_be_one_sequence(dense_and_flap):
    with pytest.raises(PrunekitError, match=r"one sequence of shape \(1, n\), got \(2, 64\)"):
        measure_speed({"dense": dense_and_flap[0]}, random_ids(2, 64), runtimes=("eager",))


# -- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    save_tiny_llama(root / "dense")
    text = root / "text.txt"
    rng = random.Random(2)
    text.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(3)))
    return root, text


def test_cli_speed_table_and_json(capsys, folders):
    root, text = folders
    code, _out, err = run(capsys, "prune", root / "dense", "--method", "magnitude-sp", "--sparsity", "0.5",
                          "--out", root / "half")
    assert code == 0, err
    code, out, err = run(capsys, "speed", root / "dense", root / "half", "--text", text, "--runtime", "eager",
                         "--prefill-tokens", "64", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                         "--save-json", root / "speed.json")
    assert code == 0, err
    assert "prefill tok/s" in out and "eager decode tok/s" in out and "(x1.00)" in out
    import json

    saved = json.loads((root / "speed.json").read_text())
    assert list(saved["models"]) == [str(root / "dense"), str(root / "half")]
    assert saved["protocol"]["text"] == str(text) and "torch" in saved["protocol"]["versions"]
    assert saved["models"][str(root / "half")]["parameters"] < saved["models"][str(root / "dense")]["parameters"]


@pytest.mark.parametrize(("extra", "needle"), [
    (["--runtime", "eager,tensorrt"], "unknown runtime 'tensorrt'"),
    (["--prompt-tokens", "100", "--prefill-tokens", "64"], "--prompt-tokens 100 must not exceed --prefill-tokens 64"),
    (["--new-tokens", "0"], "--new-tokens 0 must be at least 1"),
    (["--prefill-tokens", "100000"], "tokens; the prefill needs 100000"),
])
def test_cli_speed_bad_input(capsys, folders, extra, needle):
    root, text = folders
    code, _out, err = run(capsys, "speed", root / "dense", "--text", text, "--runtime", "eager", *extra)
    assert_one_line_error(code, err, needle)
