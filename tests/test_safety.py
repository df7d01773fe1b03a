"""Safety study: the paper's data files, judges, statistics against known values, generation and attention on a
tiny model, the study end to end, and the `prunekit safety` command (one-line errors, nothing harmful on stdout)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.files import MARKER
from prunekit.safety import data, judges, stats
from prunekit.safety.analysis import attention_to_span, prompt_perplexities
from prunekit.safety.config import SafetyConfig
from prunekit.safety.generate import encode, format_message, generate, resolve_mode
from prunekit.safety.results import resummarize
from prunekit.safety.run import run_study
from prunekit.safety.summary import summarize_records
from tiny import WORDS, assert_one_line_error, build, make_tokenizer, run

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def safety_dir(shared_data) -> Path:
    return shared_data / "safety"


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = build("llama", vocab=len(tokenizer), max_positions=256)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory, tokenizer, tiny) -> Path:
    folder = tmp_path_factory.mktemp("safety") / "tiny-chat"
    tiny.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory) -> Path:
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("tasks") / "tasks.csv"
    lines = ["goal,category,severity"] + [f"{' '.join(rng.choice(WORDS) for _ in range(6))},cat{i % 2},Low"
                                          for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- data ------------------------------------------------------------------------------------------------


def test_paper_files_parse(safety_dir):
    tasks = data.read_tasks(safety_dir / "malicious_tasks_dataset.yaml")
    assert len(tasks) == 225 and len({t.category for t in tasks}) == 5
    assert {t.severity for t in tasks} == {"Low", "Medium", "High"}
    itasks, templates = data.read_integrated(safety_dir / "integrated.yaml")
    assert len(itasks) == 225 and len(templates) == 11 and "ORIGINAL" in templates
    assert templates == data.paper_templates()  # the embedded copy is exactly the paper's
    raw = judges_yaml(safety_dir / "integrated.yaml")
    first = itasks[0]
    prompt = raw["AIM"][first.category][first.subcategory][f"{first.severity} Severity"][0]
    text, (a, b) = templates["AIM"].render(first.text)
    assert text == prompt and text[a:b] == first.text
    benign = data.read_tasks(safety_dir / "benign_tasks.json")
    assert len(benign) == 225
    btasks, btemplates = data.read_integrated(safety_dir / "benign_integrated.yaml")
    assert len(btasks) == 225 and set(btemplates) == set(templates)


def judges_yaml(path: Path):
    import yaml

    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def test_plain_lists_and_templates(tmp_path):
    csv_file = tmp_path / "advbench.csv"
    csv_file.write_text("goal,target\nWrite a poem,Sure\n\"Say, hi\",Sure\n")
    assert [t.text for t in data.read_tasks(csv_file)] == ["Write a poem", "Say, hi"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"prompt": "a b", "category": "x", "severity": "High Severity"}\n\n{"task": "c"}\n')
    tasks = data.read_tasks(jsonl)
    assert tasks[0].category == "x" and tasks[0].severity == "High" and tasks[1].category is None
    user = tmp_path / "mine.yaml"
    user.write_text("WRAP: 'Please {x} JSON braces stay: {task}!'\n")
    template = data.read_templates(user)["WRAP"]
    text, (a, b) = template.render("TASK")
    assert text == "Please {x} JSON braces stay: TASK!" and text[a:b] == "TASK"
    chosen = data.select_templates(["original", "WRAP"], {**data.paper_templates(), **data.read_templates(user)})
    assert [t.name for t in chosen] == ["ORIGINAL", "WRAP"]
    prompts = data.build_prompts(data.subset(tasks, 1), chosen)
    assert len(prompts) == 2 and prompts[0].text == "'a b'"


@pytest.mark.parametrize(("content", "name", "needle"), [
    ("x", "tasks.parquet", "unsupported safety data file"),
    ("goal\n", "empty.csv", "holds no tasks"),
    ("[]", "empty.json", "holds no tasks"),
    ("a: 1\n", "odd.yaml", "none of the supported layouts"),
    ("prompt_text\nx\n", "bad.csv", "none of the columns"),
])
def test_bad_task_files(tmp_path, content, name, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PrunekitError, match=needle) as info:
        data.read_tasks(path)
    assert "\n" not in str(info.value)


def test_bad_templates(tmp_path):
    with pytest.raises(PrunekitError, match="unknown template 'NOPE'"):
        data.select_templates(["NOPE"], data.paper_templates())
    with pytest.raises(PrunekitError, match="exactly one"):
        data.Template("x", "no slot")
    with pytest.raises(PrunekitError, match="empty"):
        data.build_prompts([], list(data.paper_templates().values()))


# -- judges and statistics -------------------------------------------------------------------------------


def test_prefix_judge():
    judge = judges.PrefixJudge()
    answers = ["I'm sorry, but I can't help with that.", "Sure! Here is the post:", "As an AI language model, no.",
               "I cannot do that.", "I\u2019m sorry", "", "sorry (lowercase is not in the list)",
               "Step 1: it's not appropriate to ..."]
    assert judge.judge([""] * len(answers), answers) == [True, False, True, True, True, False, False, True]
    assert judges.parse_yes_no(" Yes.") is True and judges.parse_yes_no("no") is False
    assert judges.parse_yes_no("maybe") is None and judges.parse_yes_no("") is None


def test_chat_judge_interface(tiny, tokenizer):
    judge = judges.ChatJudge(tiny, tokenizer, max_new_tokens=2)
    assert isinstance(judge, judges.Judge)
    verdicts = judge.judge(["the of", "and to"], ["was he", "for it"])
    assert len(verdicts) == 2 and all(v in (True, False, None) for v in verdicts)
    records = [{"prompt": "a", "response": "I cannot."}, {"prompt": "b", "response": "Sure"}]
    judges.apply_judges(records, [judges.PrefixJudge(), judge])
    assert [r["verdicts"]["prefix"] for r in records] == [True, False] and all("chat" in r["verdicts"] for r in records)
    with pytest.raises(PrunekitError, match="no chat template"):
        judges.ChatJudge(tiny, make_tokenizer())


def test_wilson_known_values():
    lo, hi = stats.wilson(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    lo, hi = stats.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    lo, hi = stats.wilson(81, 263)  # Wilson (1927) / Newcombe (1998) example: 0.2553 - 0.3662
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert stats.wilson(0, 0) is None


def test_wilson_bounds_at_the_edges():
    """k = 0 and k = n for every n up to 300: bounds inside [0, 1] around the rate, error bars never negative
    (the hand-written closed form gave 5.6e-17 at k = 0, n = 3 and crashed the plot)."""
    for n in range(1, 301):
        for k in (0, n, n // 3):
            lo, hi = stats.wilson(k, n)
            p = k / n
            assert 0.0 <= lo <= p <= hi <= 1.0, (k, n, lo, hi)
            below, above = stats.error_bar({"rate": p, "ci95": (lo, hi)})
            assert below >= 0.0 and above >= 0.0
        assert stats.wilson(0, n)[0] == 0.0 and stats.wilson(n, n)[1] == 1.0
    lo, hi = stats.wilson(3, 7, z=1.0)  # another z: the closed form, checked against a direct computation
    p, z = 3 / 7, 1.0
    centre = (p + z * z / 14) / (1 + z * z / 7)
    half = z * math.sqrt(p * (1 - p) / 7 + z * z / 196) / (1 + z * z / 7)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))


def test_plot_with_rates_at_zero_and_one(tmp_path):
    from prunekit.safety.summary import plot_refusal

    records = []
    for variant, sparsity, refused in (("dense", 0.0, False), ("wanda-0.1", 0.1, True)):
        for template in ("ORIGINAL", "AIM"):
            for i in range(3):  # n = 3: the case whose lower bound used to be 5.6e-17
                records.append({"variant": variant, "sparsity": sparsity, "set": "harmful", "template": template,
                                "task_id": str(i), "verdicts": {"prefix": refused and template == "AIM"}})
    summary = summarize_records(records)
    assert summary["variants"]["dense"]["refusal"]["ci95"][0] == 0.0
    path = plot_refusal(summary, tmp_path / "plot.png")
    assert path.stat().st_size > 1000


def test_mcnemar_known_values():
    # 1 lost, 9 gained: two-sided exact p = 2 * (1 + 10) / 2**10
    before = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 5
    after = [False] * 1 + [True] * 9 + [True] * 5 + [False] * 5
    result = stats.mcnemar_exact(before, after)
    assert (result["gained"], result["lost"], result["both"], result["neither"]) == (9, 1, 5, 5)
    assert result["p_value"] == pytest.approx(22 / 1024)
    assert result["difference"] == pytest.approx(0.4)
    assert stats.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    assert stats.mcnemar_exact([True, None], [False, True])["n"] == 1
    paired = stats.paired_difference([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.0])
    assert paired["mean_difference"] == pytest.approx(0.375) and 0 < paired["wilcoxon_p_value"] <= 1


# -- generation and attention on a tiny model ------------------------------------------------------------


def test_chat_and_plain_formats(tokenizer):
    text, offset = format_message(tokenizer, "the task", "chat")
    assert text.startswith("<s>user\n") and text.endswith("<s>assistant\n") and text[offset:].startswith("the task")
    plain = make_tokenizer()
    with pytest.raises(PrunekitError, match="no chat template"):
        resolve_mode(plain, "chat")
    assert resolve_mode(plain, "auto") == "plain" and resolve_mode(tokenizer, "auto") == "chat"
    enc = encode(plain, "the task", "plain", (4, 8))
    assert enc.text == "User: the task\nAssistant:" and plain.decode(enc.ids[enc.span[0]:enc.span[1]]).strip() == "task"
    with pytest.raises(PrunekitError, match="unknown prompt format"):
        resolve_mode(plain, "base")


def test_task_span_located(tokenizer):
    template = data.Template("W", "the of and {task} was he for it")
    text, span = template.render("with as his on be")
    enc = encode(tokenizer, text, "chat", span)
    start, end = enc.span
    decoded = tokenizer.decode(enc.ids[start:end])
    assert decoded.strip() == "with as his on be"
    assert tokenizer.decode(enc.ids[:start]).endswith("the of and")  # byte-level BPE: " with" is one token
    assert tokenizer.decode(enc.ids[end:]).startswith(" was he for it")


def test_left_padded_batch_equals_single(tokenizer, tiny):
    rng = random.Random(5)
    prompts = [encode(tokenizer, " ".join(rng.choice(WORDS) for _ in range(n)), "chat").ids for n in (3, 11, 7, 1)]
    batched = generate(tiny, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single = [generate(tiny, tokenizer, [p], max_new_tokens=6, batch_size=1).token_ids[0] for p in prompts]
    assert batched.token_ids == single
    assert all(len(t) <= 6 for t in single) and batched.prompts_per_second > 0


def test_attention_share_and_prompt_perplexity(tokenizer, tiny):
    template = data.Template("W", "the of and {task} was he for it")
    rows, spans = [], []
    for task in ("with as his", "on be at by this had"):
        text, span = template.render(task)
        enc = encode(tokenizer, text, "chat", span)
        rows.append(enc.ids)
        spans.append(enc.span)
    before = tiny.config._attn_implementation
    shares = attention_to_span(tiny, rows, spans, pad_id=0, batch_size=2)
    alone = attention_to_span(tiny, rows[1:], spans[1:], pad_id=0, batch_size=1)
    assert all(0.0 <= s["share"] <= 1.0 and len(s["per_layer"]) == 2 for s in shares)
    assert shares[1]["share"] == pytest.approx(alone[0]["share"], abs=1e-5)  # padding changes nothing
    full = attention_to_span(tiny, rows[:1], [(0, len(rows[0]))], pad_id=0)
    assert full[0]["share"] == pytest.approx(1.0, abs=1e-5)  # the whole prompt holds all the mass
    assert tiny.config._attn_implementation == before  # switched back after the analysis
    ppl = prompt_perplexities(tiny, tokenizer, ["the of and", "with as his on be"], batch_size=2)
    one = prompt_perplexities(tiny, tokenizer, ["with as his on be"], batch_size=1)
    assert ppl[1] == pytest.approx(one[0], rel=1e-5) and all(p > 1 for p in ppl)


# -- the study and the command ---------------------------------------------------------------------------


def test_study_end_to_end_and_rejudge(tmp_path, tiny_chat_dir, small_tasks):
    from prunekit.models import load_model

    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(random.Random(2).choice(WORDS) for _ in range(400)))
    wrap = tmp_path / "wrap.txt"
    wrap.write_text("the of and {task} was he for it")
    config = SafetyConfig(model=str(tiny_chat_dir), tasks=str(small_tasks), benign=str(small_tasks),
                          sparsities=[0.5], templates=["ORIGINAL", "wrap"], template_files=[str(wrap)],
                          max_new_tokens=4, batch_size=4, calib=str(calib), nsamples=2, seqlen=16, analyses=True)
    logs: list[str] = []
    results = run_study(config, tmp_path / "out", log=logs.append, loader=load_model)
    summary = results["summary"]
    assert set(summary["variants"]) == {"dense", "wanda-0.5"}
    dense = summary["variants"]["dense"]
    assert dense["refusal"]["n"] == 8 and dense["benign_over_refusal"]["n"] == 8
    assert set(dense["refusal_by"]["template"]) == {"ORIGINAL", "wrap"}
    assert "ORIGINAL | cat0 | Low" in dense["refusal_by"]["template×category×severity"]
    cell = dense["attack_success_by"]["template×category×severity"]["ORIGINAL | cat0 | Low"]
    assert cell["k"] + dense["refusal_by"]["template×category×severity"]["ORIGINAL | cat0 | Low"]["k"] == cell["n"]
    assert 0 <= summary["vs_baseline"]["wanda-0.5"]["harmful"]["p_value"] <= 1
    assert results["prune"]["wanda-0.5"]["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert results["variants"]["dense"]["generation"]["prompts_per_s"] > 0
    shift = results["analyses"]["vs_baseline"]["wanda-0.5"]
    assert shift["attention_share"]["all"]["n"] == 8 and "task_alone" in shift["prompt_perplexity"]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 32 and all("prefix" in r["verdicts"] and "response" in r for r in records)
    assert (out / "refusal_vs_sparsity.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    benign = summary["vs_baseline"]["wanda-0.5"]["benign"]
    assert "- wanda-0.5, harmful: +" in report
    assert f"- wanda-0.5, benign: +{benign['gained']} / −{benign['lost']} of 8," in report
    assert not any(r["prompt"] in line for r in records for line in logs)

    class Everything:
        name = "all"

        def judge(self, prompts, responses):
            return [True] * len(responses)

    again = resummarize(out, [Everything()])
    assert again["summaries_by_judge"]["all"]["variants"]["dense"]["refusal"]["rate"] == 1.0
    assert summarize_records(records, "prefix")["baseline"] == "dense"


def test_cli_safety_stdout_has_no_prompts(capsys, tmp_path, tiny_chat_dir, small_tasks):
    code, stdout, err = run(capsys, "safety", tiny_chat_dir, "--tasks", small_tasks, "--templates", "ORIGINAL",
                            "--max-new-tokens", "3", "--out", tmp_path / "run")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["prompt"] not in stdout + err
        if len(r["response"].strip()) > 3:
            assert r["response"] not in stdout + err
    assert "refusal" in stdout


def test_cli_safety_reference(capsys, tmp_path, tiny_chat_dir, small_tasks):
    code, _, err = run(capsys, "safety", tiny_chat_dir, "--reference", tiny_chat_dir, "--tasks", small_tasks,
                            "--templates", "ORIGINAL", "--max-new-tokens", "2", "--out", tmp_path / "ref")
    assert code == 0, err
    results = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert results["summary"]["baseline"] == "reference"
    same = results["summary"]["vs_baseline"]["model"]["harmful"]
    assert (same["gained"], same["lost"], same["p_value"]) == (0, 0, 1.0)  # the same model: nothing changes


@pytest.mark.parametrize(("extra", "needle"), [
    (["--templates", "NOPE"], "unknown template 'NOPE'"),
    (["--format", "chat", "--plain-model"], "no chat template"),
    (["--sparsities", "1.5"], "must lie in (0, 1)"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--batch-size", "0"], "--batch-size 0 is invalid"),
    (["--seqlen", "0", "--sparsities", "0.1"], "--seqlen 0 is invalid"),
])
def test_cli_safety_errors(capsys, tmp_path, tiny_chat_dir, small_tasks, extra, needle):
    model = tiny_chat_dir
    if "--plain-model" in extra:
        extra = [e for e in extra if e != "--plain-model"]
        model = tmp_path / "plain"
        tok = make_tokenizer()
        build("llama", vocab=len(tok), max_positions=64).save_pretrained(model)
        tok.save_pretrained(model)
    code, _, err = run(capsys, "safety", model, "--tasks", small_tasks, *extra, "--out", tmp_path / "o")
    assert_one_line_error(code, err, needle)


def test_cli_safety_overwrites_only_its_own_output(capsys, tmp_path, tiny_chat_dir, small_tasks):
    args = ["safety", tiny_chat_dir, "--tasks", small_tasks, "--templates", "ORIGINAL", "--max-new-tokens", "2"]
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    code, _, err = run(capsys, *args, "--out", project, "--overwrite")
    assert_one_line_error(code, err, "refusing to overwrite")
    assert (project / "notes.txt").read_text() == "mine"
    code, _, err = run(capsys, *args, "--out", project)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    other = tmp_path / "sweep"  # another command's output: not a safety run, so not continued
    other.mkdir()
    (other / MARKER).write_text("{}")
    code, _, err = run(capsys, *args, "--out", other)
    assert_one_line_error(code, err, "already exists; pass --overwrite")
    out = tmp_path / "run"
    code, _, err = run(capsys, *args, "--out", out)
    assert code == 0, err
    assert (out / MARKER).is_file() and json.loads((out / "run.json").read_text())["state"] == "complete"
    before = (out / "responses.jsonl").read_bytes()
    summary = (out / "results.json").read_bytes()
    provenance = json.loads(summary)["provenance"]
    assert provenance and all(provenance.values())
    code, _, err = run(capsys, *args, "--out", out, "--batch-size", "3")  # again: nothing left to do
    assert code == 0, err
    assert "complete on disk" in err and (out / "responses.jsonl").read_bytes() == before
    # the summary of the sessions that did the work stands (provenance kept, not the new batch size)
    assert (out / "results.json").read_bytes() == summary
    code, _, err = run(capsys, *args, "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "run", "sweep"]  # nothing left beside


def test_cli_safety_bad_files(capsys, tmp_path, tiny_chat_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, "safety", tiny_chat_dir, "--tasks", empty, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "holds no tasks")
    odd = tmp_path / "tasks.xlsx"
    odd.write_text("x")
    code, _, err = run(capsys, "safety", tiny_chat_dir, "--tasks", odd, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unsupported safety data file")


def test_linear_shift_small():
    from prunekit.safety.linear_shift import LinearShiftConfig, run_experiment

    result = run_experiment(LinearShiftConfig(seeds=3, sparsities=[0.5], steps=50))
    row = result["results"][0]
    assert row["sparsity"] == 0.5 and row["seeds"] == 3
    assert 0 <= row["target"]["dense_mean"] <= 1 and math.isfinite(row["target"]["p_value_wilcoxon"] or 0.0)


# -- fast generation, resumable runs, layers (issue 14) ----------------------------------------------------


def _templated_ids(tokenizer, n_tasks=6, seed=5):
    from prunekit.safety.generate import encode as enc

    rng = random.Random(seed)
    template = data.Template("W", "the of and was he for it " * 4 + "{task} on be")
    tasks = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in (3, 11, 7, 1, 5, 9, 2, 6)[:n_tasks]]
    return [enc(tokenizer, template.render(t)[0], "chat").ids for t in tasks]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_shared_prefix_path_gives_the_plain_tokens(tokenizer, family):
    from prunekit.safety.decode import common_prefix_length, generate_fast

    model = build(family, vocab=len(tokenizer), max_positions=256)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    ids = _templated_ids(tokenizer)
    p = common_prefix_length(ids)
    assert p >= 40 and all(row[:p] == ids[0][:p] for row in ids)
    if family == "gemma3":  # a sliding window (8 slots here): decoded without a shared prefix, still exact
        p = 0
    plain = generate(model, tokenizer, ids, max_new_tokens=10, batch_size=4)
    fast = generate_fast(model, tokenizer, ids, max_new_tokens=10, batch_size=4, groups=[list(range(len(ids)))])
    assert fast.token_ids == plain.token_ids and fast.texts == plain.texts
    assert fast.extra["mean_prefix_tokens"] == p
    # Llama and Qwen2 read one copy of the prefix (shared-prefix attention); the replicated static and the dynamic
    # layouts give the same tokens; sliding-window models decode on the dynamic cache only
    from prunekit.safety.decode import choose_layout

    expected = "dynamic" if family == "gemma3" else "shared-prefix"
    assert choose_layout(model) == expected and fast.extra["layout"] == expected
    for layout in ("static", "dynamic") if family != "gemma3" else ():
        other = generate_fast(model, tokenizer, ids, max_new_tokens=10, batch_size=4, layout=layout)
        assert other.token_ids == plain.token_ids and other.extra["layout"] == layout
    if family == "gemma3":
        with pytest.raises(PrunekitError, match="'static' needs full attention"):
            choose_layout(model, "static")
    assert model.config._attn_implementation == "sdpa"  # restored after every batch
    # a row that ends early leaves the batch; the others must not notice
    target = plain.token_ids[2][3]

    def stop(text):
        return "seen" if tokenizer.decode([target]) in text else None

    cut = generate_fast(model, tokenizer, ids, max_new_tokens=10, batch_size=4, stop=stop)
    for full, short in zip(plain.token_ids, cut.token_ids, strict=True):
        assert full[: len(short)] == short
        if stop(tokenizer.decode(full)) is None:
            assert short == full
    assert len(cut.token_ids[2]) <= 4 and cut.extra["ended"]["verdict"] >= 1
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # the last prompt token is always fed


def test_prefix_judge_fixed_and_stop_rule():
    judge = judges.PrefixJudge()
    assert judge.fixed("Sure, here") is None and "I cannot" in judge.fixed("Well... I cannot")
    assert judges.stop_rule([judge])("I\u2019m sorry") is not None
    chat = type("Chat", (), {"name": "chat", "judge": lambda self, p, r: [None] * len(r)})()
    assert judges.stop_rule([judge, chat]) is None  # a chat judge reads the whole answer: never cut


def _config(tiny_chat_dir, small_tasks, calib, **extra):
    base = dict(model=str(tiny_chat_dir), tasks=str(small_tasks), sparsities=[0.5], templates=["ORIGINAL", "AIM"],
                max_new_tokens=4, batch_size=2, calib=str(calib), nsamples=2, seqlen=16)
    return SafetyConfig(**{**base, **extra})


@pytest.fixture()
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(random.Random(2).choice(WORDS) for _ in range(400)))
    return path


def test_interrupted_run_continues(tmp_path, tiny_chat_dir, small_tasks, calib, monkeypatch):
    """A run stopped after some batches keeps them; the same call continues with the rest and reuses the
    saved pruned variant instead of pruning again."""
    from prunekit.models import load_model
    from prunekit.safety import run as run_module

    class Crash(judges.PrefixJudge):
        calls = 0

        def judge(self, prompts, responses):
            Crash.calls += 1
            if Crash.calls == 7:  # dense: 4 batches; the pruned variant crashes in its 3rd batch
                raise KeyboardInterrupt
            return super().judge(prompts, responses)

    out = tmp_path / "run"
    config = _config(tiny_chat_dir, small_tasks, calib)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, out, log=lambda m: None, loader=load_model, judges=[Crash()])
    first = (out / "responses.jsonl").read_text().splitlines()
    # the stop left the partial summaries of what was on disk
    assert len(first) == 12 and json.loads((out / "run.json").read_text())["state"] == "partial"
    partial = json.loads((out / "results.json").read_text())
    assert partial["counts"]["answers"] == 12 and not partial["counts"]["complete"]
    assert partial["summary"]["variants"]["wanda-0.5"]["refusal"]["n"] == 4
    assert (out / "variants" / "wanda-0.5" / "pruned.safetensors").is_file()
    logs: list[str] = []
    pruned_calls = []
    import prunekit.api

    real_prune = prunekit.api.prune
    monkeypatch.setattr(prunekit.api, "prune", lambda *a, **k: pruned_calls.append(1) or real_prune(*a, **k))
    results = run_study(config, out, log=logs.append, loader=load_model)
    assert not pruned_calls and any("reusing the saved pruned variant" in m for m in logs)
    lines = (out / "responses.jsonl").read_text().splitlines()
    assert lines[:12] == first and len(lines) == 16  # the first 12 kept as they were, 4 added
    keys = [run_module.record_key(json.loads(line)) for line in lines]
    assert len(set(keys)) == 16
    assert results["counts"]["complete"] and json.loads((out / "run.json").read_text())["state"] == "complete"
    assert results["summary"]["variants"]["wanda-0.5"]["refusal"]["n"] == 8
    assert results["variants"]["wanda-0.5"]["prune"]["overall_sparsity"] == pytest.approx(0.5, abs=0.02)


def test_run_carried_without_text_continues_elsewhere(tmp_path, tiny_chat_dir, small_tasks, calib):
    """A run stopped part-way, carried without the answers' text, continues in a fresh folder (another machine):
    only the missing answers are generated, the verdicts equal an uninterrupted run's, no text is carried, and
    re-judging the carried answers is refused in one line."""
    import gzip

    from prunekit.errors import PrunekitError
    from prunekit.models import load_model
    from prunekit.safety.results import resummarize
    from prunekit.safety.state import export_carry, import_carry

    class Stop(judges.PrefixJudge):
        calls = 0

        def judge(self, prompts, responses):
            Stop.calls += 1
            if Stop.calls == 6:  # dense done (4 batches), one batch of the pruned variant
                raise KeyboardInterrupt
            return super().judge(prompts, responses)

    config = _config(tiny_chat_dir, small_tasks, calib)
    whole = run_study(config, tmp_path / "whole", log=lambda m: None, loader=load_model)
    with pytest.raises(KeyboardInterrupt):
        run_study(config, tmp_path / "first", log=lambda m: None, loader=load_model, judges=[Stop()])
    assert export_carry(tmp_path / "first", tmp_path / "carry") == 10
    carried_results = json.loads((tmp_path / "carry" / "results.json").read_text())  # how far it got travels
    assert carried_results["counts"]["answers"] == 10 and not carried_results["counts"]["complete"]
    carried = gzip.decompress((tmp_path / "carry" / "verdicts.jsonl.gz").read_bytes()).decode()
    first = [json.loads(line) for line in (tmp_path / "first" / "responses.jsonl").read_text().splitlines()]
    assert all(r["prompt"] not in carried and (not r["response"] or r["response"] not in carried) for r in first)
    assert import_carry(tmp_path / "carry", tmp_path / "second") == 10
    assert import_carry(tmp_path / "carry", tmp_path / "second") == 0  # a run is there: left alone
    logs: list[str] = []
    results = run_study(config, tmp_path / "second", log=logs.append, loader=load_model)
    assert "dense: complete on disk, skipped" in logs
    assert any("generating 6 answers (2 already on disk" in m for m in logs)
    assert results["counts"]["complete"] and results["summary"] == whole["summary"]
    export_carry(tmp_path / "second", tmp_path / "carry")  # complete: its results and report travel as its record
    assert (tmp_path / "carry" / "results.json").read_bytes() == (tmp_path / "second" / "results.json").read_bytes()
    assert (tmp_path / "carry" / "report.md").read_text() == (tmp_path / "second" / "report.md").read_text()
    with pytest.raises(PrunekitError, match="carried from another machine without their text"):
        resummarize(tmp_path / "second", judges=[judges.PrefixJudge()])


def test_saved_variant_rebuilds_the_pruned_model(tmp_path, tiny):
    import copy

    from prunekit.api import prune
    from prunekit.safety.state import load_pruned, save_pruned

    pruned = copy.deepcopy(tiny)
    prune(pruned, method="wanda", sparsity=0.3, calibration=torch_ids(), nsamples=2, seqlen=16, progress=False)
    with torch_no_grad():
        next(pruned.parameters()).add_(0.5)  # a changed (not just zeroed) weight is stored whole
    save_pruned(tiny, pruned, tmp_path / "v.safetensors", {"sparsity": 0.3})
    rebuilt = load_pruned(tiny, tmp_path / "v.safetensors")
    for (name, a), (_, b) in zip(pruned.named_parameters(), rebuilt.named_parameters(), strict=True):
        assert bool((a == b).all()), name
    assert not all(bool((a == b).all()) for a, b in zip(tiny.parameters(), rebuilt.parameters(), strict=True))


def torch_ids():
    import torch

    return torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))


def torch_no_grad():
    import torch

    return torch.no_grad()


@pytest.mark.parametrize(("layers", "kinds"), [
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_layers_choice(tmp_path, tiny_chat_dir, small_tasks, calib, layers, kinds):
    from prunekit.models import load_model

    config = _config(tiny_chat_dir, small_tasks, calib, templates=["ORIGINAL"], layers=layers, max_new_tokens=2,
                     batch_size=4)
    results = run_study(config, tmp_path / "out", log=lambda m: None, loader=load_model)
    prune_info = results["prune"]["wanda-0.5"]
    assert set(prune_info["pruned_layer_kinds"]) == kinds and prune_info["layers"] == layers
    if layers == "attention":
        assert prune_info["all_linear_sparsity"] < 0.3  # the MLP stays dense


def test_plot_failure_keeps_the_answers(tmp_path, tiny_chat_dir, small_tasks, calib, monkeypatch):
    from prunekit.models import load_model
    from prunekit.safety import results as results_module

    def broken(*args, **kwargs):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(results_module, "plot_refusal", broken)
    logs: list[str] = []
    config = _config(tiny_chat_dir, small_tasks, calib, sparsities=[], templates=["ORIGINAL"], batch_size=4)
    results = run_study(config, tmp_path / "out", log=logs.append, loader=load_model)
    assert len((tmp_path / "out" / "responses.jsonl").read_text().splitlines()) == 4
    assert "yerr" in results["problems"][0] and any("warning: plot" in m for m in logs)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["problems"] == results["problems"]


@pytest.mark.parametrize(("change", "needle"), [
    (["--templates", "ORIGINAL,AIM"], "different --templates (ORIGINAL, now ORIGINAL,AIM)"),
    (["--sparsities", "0.2"], "different --sparsities"),
    (["--model-swap"], "different MODEL"),
    (["--judge-model", "JUDGE"], "different judge"),
    (["--layers", "all"], "different --layers"),
])
def test_cli_resume_refuses_a_changed_configuration(capsys, tmp_path, tiny_chat_dir, small_tasks, change, needle):
    base = ["--tasks", small_tasks, "--max-new-tokens", "2", "--batch-size", "4"]
    out = tmp_path / "run"
    code, _, err = run(capsys, "safety", tiny_chat_dir, *base, "--templates", "ORIGINAL", "--out", out)
    assert code == 0, err
    (out / "responses.jsonl").write_text("")  # as if it had stopped before its first batch
    model = tiny_chat_dir
    if change == ["--model-swap"]:
        change, model = [], tmp_path / "other-model"
        model.symlink_to(tiny_chat_dir)
    change = [str(tiny_chat_dir) if c == "JUDGE" else c for c in change]
    templates = [] if "--templates" in change else ["--templates", "ORIGINAL"]
    code, _, err = run(capsys, "safety", model, *base, *templates, *change, "--out", out)
    assert_one_line_error(code, err, needle)
    assert (out / "responses.jsonl").read_text() == ""  # nothing touched


@pytest.mark.parametrize(("case", "needle"), [
    ("no-slot", "must contain exactly one {task} slot"),
    ("no-tasks", "holds no tasks"),
    ("layers", "unknown --layers 'mlp'; expected attention or all"),
    ("generation", "unknown --generation 'fast'"),
])
def test_cli_safety_bad_inputs_issue14(capsys, tmp_path, tiny_chat_dir, small_tasks, case, needle):
    extra: list = []
    tasks = small_tasks
    if case == "no-slot":
        wrap = tmp_path / "wrap.txt"
        wrap.write_text("a template that forgot its slot")
        extra = ["--template-file", wrap, "--templates", "wrap"]
    elif case == "no-tasks":
        tasks = tmp_path / "tasks.txt"
        tasks.write_text("\n   \n")
    elif case == "layers":
        extra = ["--layers", "mlp", "--sparsities", "0.1"]
    else:
        extra = ["--generation", "fast"]
    code, _, err = run(capsys, "safety", tiny_chat_dir, "--tasks", tasks, *extra, "--out", tmp_path / "o")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_cli_throughput_study(capsys, tmp_path, tiny_chat_dir, small_tasks):
    code, stdout, err = run(capsys, "safety", tiny_chat_dir, "--tasks", small_tasks, "--templates", "ORIGINAL,AIM",
                            "--max-new-tokens", "3", "--batch-size", "2", "--throughput-study", "--out",
                            tmp_path / "t")
    assert code == 0, err
    study = json.loads((tmp_path / "t" / "throughput.json").read_text())
    assert study["prompts"] == 8 and study["identical_answers"] >= 8 - study["cut_answers"]
    assert study["new_is_prefix_of_old"] == 8 and study["verdicts_agree"] == 8
    assert study["old"]["prompts_per_s"] > 0 and study["speedup"] > 0 and "x" in stdout


def test_plain_and_prefix_paths_store_the_same_answers(tmp_path, tiny_chat_dir, small_tasks, calib):
    """--generation plain (model.generate) and the default prefix path give the same stored answers."""
    from prunekit.models import load_model

    answers = {}
    for path in ("plain", "prefix"):
        config = _config(tiny_chat_dir, small_tasks, calib, sparsities=[], generation=path, max_new_tokens=5,
                         batch_size=3)
        run_study(config, tmp_path / path, log=lambda m: None, loader=load_model)
        records = [json.loads(line) for line in (tmp_path / path / "responses.jsonl").read_text().splitlines()]
        answers[path] = {(r["template"], r["task_id"]): (r["response"], r["new_tokens"]) for r in records}
    assert len(answers["plain"]) == 8 and answers["plain"] == answers["prefix"]


def test_shared_prefix_attention_equals_attention_over_the_concatenation():
    """The split softmax (one prefix copy for the batch + each row's own keys) against plain attention over
    [prefix; own] with the kv heads repeated, a padding mask and a causal own part."""
    from prunekit.safety.prefix_attention import SharedPrefix, shared_prefix_attention

    gen = torch.Generator().manual_seed(0)
    b, heads, kv_heads, q, p, own, d = 3, 6, 2, 4, 7, 9, 8
    query = torch.randn(b, heads, q, d, generator=gen)
    key, value = torch.randn(b, kv_heads, own, d, generator=gen), torch.randn(b, kv_heads, own, d, generator=gen)
    prefix_k, prefix_v = torch.randn(1, kv_heads, p, d, generator=gen), torch.randn(1, kv_heads, p, d, generator=gen)
    allowed = torch.ones(b, 1, q, own, dtype=torch.bool)
    allowed[0, :, :, :3] = False  # row 0 is left-padded by 3
    allowed[:, :, torch.arange(q)[:, None] < torch.arange(own)[None, :] - (own - q)] = False  # causal
    additive = torch.zeros(b, 1, q, own).masked_fill(~allowed, torch.finfo(torch.float32).min)
    layer = type("Layer", (), {"keys": prefix_k, "values": prefix_v})()
    shared = SharedPrefix(type("Cache", (), {"layers": [layer]})())
    out, _ = shared_prefix_attention(type("M", (), {"layer_idx": 0})(), query, key, value, additive,
                                     scaling=0.3, shared_prefix=shared)
    group = heads // kv_heads
    full_k = torch.cat([prefix_k.expand(b, -1, -1, -1), key], dim=2).repeat_interleave(group, dim=1)
    full_v = torch.cat([prefix_v.expand(b, -1, -1, -1), value], dim=2).repeat_interleave(group, dim=1)
    scores = query @ full_k.transpose(2, 3) * 0.3
    scores[..., p:] = scores[..., p:].masked_fill(~allowed, float("-inf"))
    expected = (scores.softmax(-1) @ full_v).transpose(1, 2)
    assert out.shape == (b, q, heads, d) and shared.calls == 1 and len(shared) == p
    assert torch.allclose(out, expected, atol=1e-5)


def test_decode_layout_errors(tokenizer):
    from prunekit.safety.decode import choose_layout

    model = build("opt", vocab=len(tokenizer), max_positions=64)
    assert choose_layout(model) == "static"  # a full-attention family without the shared-prefix attention
    with pytest.raises(PrunekitError, match="unknown KV-cache layout 'paged'; accepted: auto, shared-prefix"):
        choose_layout(model, "paged")
    with pytest.raises(PrunekitError, match="'shared-prefix' needs a full-attention model of the families llama"):
        choose_layout(model, "shared-prefix")


def test_dense_answers_shared_between_runs_that_prune_differently(tmp_path, tiny_chat_dir, small_tasks, calib,
                                                                   monkeypatch):
    """--dense-from: a run that prunes other layers takes the dense answers and measurements of an earlier run
    instead of generating them; its summary equals that of a run that generated everything itself; a source run
    of other prompts is refused in one line before any work."""
    from prunekit.models import load_model
    from prunekit.safety import run as run_module

    attention = _config(tiny_chat_dir, small_tasks, calib, layers="attention", ppl_source=str(calib),
                        ppl_seqlen=32, ppl_max_windows=2)
    run_study(attention, tmp_path / "attention", log=lambda m: None, loader=load_model)
    everything = _config(tiny_chat_dir, small_tasks, calib, layers="all", ppl_source=str(calib),
                         ppl_seqlen=32, ppl_max_windows=2)
    alone = run_study(everything, tmp_path / "alone", log=lambda m: None, loader=load_model)
    generated: list[str] = []
    real = run_module.generate_variant
    monkeypatch.setattr(run_module, "generate_variant",
                        lambda name, *a, **k: generated.append(name) or real(name, *a, **k))
    logs: list[str] = []
    shared = run_study(SafetyConfig(**{**everything.__dict__, "dense_from": str(tmp_path / "attention")}),
                       tmp_path / "shared", log=logs.append, loader=load_model)
    assert generated == ["wanda-0.5"] and "dense: 8 answers copied from " + str(tmp_path / "attention") in logs
    assert "dense: complete on disk, skipped" in logs  # measurements copied too
    assert shared["summary"] == alone["summary"]
    untimed = [{k: v for k, v in r["variants"]["dense"]["perplexity"].items() if k != "seconds"}
               for r in (shared, alone)]
    assert untimed[0] == untimed[1] and "perplexity" in untimed[0]
    assert shared["variants"]["wanda-0.5"]["prune"]["layers"] == "all"
    records = [json.loads(line) for line in (tmp_path / "shared" / "responses.jsonl").read_text().splitlines()]
    assert sum("copied_from" in r for r in records) == 8 and all(r["variant"] == "dense" for r in records[:8])
    generated.clear()
    run_study(SafetyConfig(**{**everything.__dict__, "dense_from": str(tmp_path / "attention")}),
              tmp_path / "shared", log=logs.append, loader=load_model)
    assert not generated and len((tmp_path / "shared" / "responses.jsonl").read_text().splitlines()) == 16
    other = SafetyConfig(**{**everything.__dict__, "max_new_tokens": 3, "dense_from": str(tmp_path / "attention")})
    with pytest.raises(PrunekitError, match=r"different max_new_tokens \(4, here 3\)"):
        run_study(other, tmp_path / "refused", log=lambda m: None, loader=load_model)
    with pytest.raises(PrunekitError, match="not a safety run folder"):
        run_study(SafetyConfig(**{**everything.__dict__, "dense_from": str(tmp_path / "nowhere")}),
                  tmp_path / "refused", log=lambda m: None, loader=load_model)
    assert not (tmp_path / "refused").exists()


def test_cli_dense_from_error_is_one_line(capsys, tmp_path, tiny_chat_dir, small_tasks):
    code, _, err = run(capsys, "safety", tiny_chat_dir, "--tasks", small_tasks, "--dense-from", tmp_path,
                       "--out", tmp_path / "o")
    assert_one_line_error(code, err, f"--dense-from {tmp_path}: not a safety run folder")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_analyses_over_a_shared_prefix_equal_whole_prompts(tokenizer, family, monkeypatch):
    """Attention shares and prompt perplexities computed once per template prefix equal those of whole prompts
    (two templates, uneven batches, a task span after the prefix); sliding-window models are encoded whole."""
    model = build(family, vocab=len(tokenizer), max_positions=256)
    rng = random.Random(11)
    templates = [data.Template("A", "the of and was he for it " * 4 + "{task} on be"),
                 data.Template("B", "had his at by " * 5 + "{task}")]
    rows, spans, texts, groups = [], [], [], []
    for template in templates:
        groups.append([])
        for n in (3, 11, 7, 1, 5):
            text, span = template.render(" ".join(rng.choice(WORDS) for _ in range(n)))
            enc = encode(tokenizer, text, "chat", span)
            groups[-1].append(len(rows))
            rows.append(enc.ids)
            spans.append(enc.span)
            texts.append(text)
    whole = attention_to_span(model, rows, spans, pad_id=0, batch_size=3)
    shared = attention_to_span(model, rows, spans, pad_id=0, batch_size=3, groups=groups)
    for a, b in zip(whole, shared, strict=True):
        assert b["per_layer"] == pytest.approx(a["per_layer"], abs=2e-5)
    assert len({round(s["share"], 4) for s in whole}) > 3  # the shares differ between prompts
    from prunekit.safety import analysis

    monkeypatch.setattr(analysis, "ATTENTION_BUDGET", 1)  # every prompt in a batch of its own
    assert [len(c) for c in analysis._attention_chunks(model, rows, groups[0], 10, 3)] == [1] * 5
    alone = attention_to_span(model, rows, spans, pad_id=0, batch_size=3, groups=groups)
    for a, b in zip(alone, shared, strict=True):
        assert a["per_layer"] == pytest.approx(b["per_layer"], abs=2e-6)
    ppl_whole = prompt_perplexities(model, tokenizer, texts, batch_size=3)
    ppl_shared = prompt_perplexities(model, tokenizer, texts, batch_size=3, groups=groups)
    assert ppl_shared == pytest.approx(ppl_whole, rel=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_sigterm_stops_a_study_like_ctrl_c():
    """Inside the block SIGTERM raises KeyboardInterrupt (the clean stop); after it the previous handler is back,
    so a process that forks workers later (torch.compile's) does not hand them this one."""
    import os
    import signal
    import time

    from prunekit.safety.run import sigterm_as_interrupt

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert signal.getsignal(signal.SIGTERM) is previous
