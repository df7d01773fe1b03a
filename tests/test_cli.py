"""The command line on tiny saved models: the happy path, and one clear line for each bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny import WORDS, assert_one_line_error, build, make_tokenizer, run


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tokenizer = make_tokenizer()
    model = build("llama", vocab=len(tokenizer), max_positions=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(10)))
    return path


def test_prune_then_reload_with_stock_transformers(capsys, tiny_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    code, _stdout, err = run(capsys, "prune", tiny_dir, "--method", "wanda", "--sparsity", "0.5", "--calib",
                            text_file, "--nsamples", "4", "--seqlen", "32", "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "prunekit.json").read_text())
    assert manifest["method"]["name"] == "wanda"
    assert abs(manifest["overall_sparsity"] - 0.5) < 1e-3
    assert manifest["calibration"]["nsamples"] == 4 and len(manifest["calibration"]["offsets"]) == 4
    assert {"statistics", "prune", "propagate"} <= set(manifest["timings_s"])
    assert manifest["memory"]["peak_rss_mib"] > 0 and "torch" in manifest["versions"]
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no staging folder left
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    q = reloaded.model.layers[0].self_attn.q_proj.weight
    assert abs((q == 0).float().mean().item() - 0.5) < 1e-3


def test_recipe_file_and_flag_override(capsys, tiny_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: magnitude\nsparsity: 0.3\npattern: '2:4'\ncalib: {text_file}\nnsamples: 2\n"
                      f"seqlen: 16\nout: {tmp_path / 'out'}\noptions:\n  group: row\n")
    code, _, err = run(capsys, "prune", tiny_dir, "--config", recipe, "--pattern", "unstructured")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert manifest["plan"]["default"] == {"sparsity": 0.3, "pattern": "unstructured"}
    assert manifest["method"]["config"] == {"group": "row", "count": "reference"}


def test_eval_json_last_line(capsys, tiny_dir, text_file):
    code, stdout, err = run(capsys, "eval", tiny_dir, "--ppl", text_file, "--seqlen", "32", "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["seqlen"] == 32 and result["tokens"] > 0 and result["perplexity"] > 1


@pytest.fixture(scope="module")
def corrupt_safetensors_dir(tmp_path_factory, tiny_dir) -> Path:
    folder = tmp_path_factory.mktemp("corrupt") / "model"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertLMHeadModel

    folder = tmp_path_factory.mktemp("bert") / "bert"
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    BertLMHeadModel(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


BAD_INPUTS = [
    ("unknown method", ["--method", "snip"], "unknown method 'snip'"),
    ("sparsity too high", ["--sparsity", "1.0"], "sparsity 1.0 is outside [0, 1)"),
    ("sparsity negative", ["--sparsity", "-0.2"], "outside [0, 1)"),
    ("N >= M", ["--pattern", "4:4"], "need 1 <= N < M"),
    ("M does not divide", ["--pattern", "2:48"], "M=48 does not divide the input width 64"),
    ("short calibration text", ["--seqlen", "120", "--nsamples", "2", "--calib", "{short}"], "shorter"),
    ("seqlen beyond context", ["--seqlen", "4096"], "exceeds the model's context of 128"),
    ("missing calibration file", ["--calib", "/nonexistent/calib.txt"], "/nonexistent/calib.txt"),
]


@pytest.mark.parametrize("label,extra,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_prune_input(capsys, tiny_dir, text_file, tmp_path, label, extra, needle):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    extra = [a.replace("{short}", str(short)) for a in extra]
    out = tmp_path / "out"
    args = ["prune", tiny_dir, "--calib", text_file, "--nsamples", "2", "--seqlen", "16", "--out", out]
    code, _, err = run(capsys, *args, *extra)
    assert_one_line_error(code, err, needle)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # nothing half-written


@pytest.mark.parametrize("label", ["missing", "no config", "corrupt gguf", "corrupt safetensors", "garbage spec",
                                   "unsupported architecture"])
def test_bad_model(capsys, tmp_path, label, corrupt_safetensors_dir, bert_dir):
    if label == "missing":
        spec, needle = tmp_path / "nope", "nope"
    elif label == "no config":
        spec = tmp_path / "empty"
        spec.mkdir()
        needle = "empty"
    elif label == "corrupt gguf":
        spec = tmp_path / "broken.gguf"
        spec.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
        needle = "broken.gguf"
    elif label == "corrupt safetensors":
        spec, needle = corrupt_safetensors_dir, "model.safetensors"
    elif label == "garbage spec":
        spec, needle = "not a model!", "not a model!"
    else:
        spec, needle = bert_dir, "unsupported architecture"
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", spec, "--method", "magnitude", "--out", out)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_existing_output_needs_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--out", out)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--out", out, "--overwrite")
    assert_one_line_error(code, err, "refusing to overwrite")  # not a prunekit output: never deleted
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--out", out, "--overwrite")
    assert code == 0, err
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--out", out, "--overwrite")
    assert code == 0, err  # a prunekit output may be replaced
    assert (out / "prunekit.json").exists()


def test_bad_recipe(capsys, tiny_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\nsparsty: 0.5\n")
    code, _, err = run(capsys, "prune", tiny_dir, "--config", recipe, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "sparsty")


def test_unknown_flag_is_one_line(capsys, tiny_dir):
    code, _, err = run(capsys, "prune", tiny_dir, "--sparsity", "half")
    assert_one_line_error(code, err, "half")


def test_no_half_written_output_on_crash(tiny_dir, tmp_path, monkeypatch):
    from prunekit.export import save as save_module

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    monkeypatch.setattr(model, "save_pretrained", lambda path, **kw: (Path(path, "partial").write_text("x"),
                                                                        explode()))
    with pytest.raises(RuntimeError):
        save_module.save_model(model, None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []
    torch.manual_seed(0)


@pytest.fixture()
def no_model_load(monkeypatch):
    """A bad option must be caught before any model is loaded: loading one fails the test."""
    import prunekit.models

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the bad option was caught")

    monkeypatch.setattr(prunekit.models, "load_model", refuse)


EARLY_BAD_OPTIONS = [
    ("prune batch size 0", ["prune", "--batch-size", "0"], "--batch-size 0 is invalid"),
    ("prune batch size negative", ["prune", "--batch-size", "-3"], "--batch-size -3 is invalid"),
    ("prune seqlen 0", ["prune", "--seqlen", "0"], "--seqlen 0 is invalid"),
    ("prune nsamples 0", ["prune", "--nsamples", "0"], "--nsamples 0 is invalid"),
    ("prune device gpu", ["prune", "--device", "gpu"], "--device 'gpu' is not a device"),
    ("prune device cuda without CUDA", ["prune", "--device", "cuda"], "CUDA is not available"),
    ("eval seqlen 0", ["eval", "--ppl", "x.txt", "--seqlen", "0"], "--seqlen 0 is invalid"),
    ("eval batch size 0", ["eval", "--ppl", "x.txt", "--batch-size", "0"], "--batch-size 0 is invalid"),
]


@pytest.mark.parametrize("label,args,needle", EARLY_BAD_OPTIONS, ids=[b[0] for b in EARLY_BAD_OPTIONS])
def test_bad_option_before_any_model_is_loaded(capsys, tiny_dir, tmp_path, no_model_load, label, args, needle):
    if "without CUDA" in label and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    command, *extra = args
    out = ["--out", tmp_path / "out"] if command == "prune" else []
    code, _, err = run(capsys, command, tiny_dir, *out, *extra)
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def tied_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
                     ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prune_head_refused_on_tied_embeddings(capsys, tmp_path):
    """Pruning a head tied to the input embeddings would silently prune the embeddings too: one line instead."""
    model = tied_llama(tmp_path / "tied")
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", model, "--method", "magnitude", "--prune-head", "--out", out)
    assert_one_line_error(code, err, "lm_head shares its weights with the input embeddings")
    assert not out.exists()


def test_prune_head_on_untied_model(capsys, tiny_dir, text_file, tmp_path):
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "wanda", "--prune-head", "--calib", text_file,
                       "--nsamples", "2", "--seqlen", "16", "--out", tmp_path / "w")
    assert_one_line_error(code, err, "only be pruned by a data-free method")  # before calibration, not after it
    code, _, err = run(capsys, "prune", tiny_dir, "--method", "magnitude", "--prune-head", "--out", tmp_path / "m")
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (reloaded.lm_head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert not (reloaded.model.embed_tokens.weight == 0).any()


def test_eval_save_json_replaces_only_its_own_summary(capsys, tiny_dir, text_file, tmp_path, monkeypatch):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    args = ["eval", tiny_dir, "--ppl", text_file, "--seqlen", "32"]
    with monkeypatch.context() as patch:
        import prunekit.models

        patch.setattr(prunekit.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
        code, _, err = run(capsys, *args, "--save-json", notes)
        assert_one_line_error(code, err, "already exists; pass --overwrite")
        code, _, err = run(capsys, *args, "--save-json", notes, "--overwrite")
        assert_one_line_error(code, err, "refusing to overwrite")
    assert notes.read_text() == '{"mine": true}'
    summary = tmp_path / "run" / "eval.json"
    code, _, err = run(capsys, *args, "--save-json", summary)
    assert code == 0, err
    code, _, err = run(capsys, *args, "--save-json", summary)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    code, _, err = run(capsys, *args, "--save-json", summary, "--overwrite")
    assert code == 0, err
    assert json.loads(summary.read_text())["kind"] == "prunekit.eval"
    assert sorted(p.name for p in summary.parent.iterdir()) == ["eval.json"]
