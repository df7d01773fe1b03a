"""Jailbreak resistance after pruning ("Pruning for Protection", Hasan et al., 2024): data, generation, judges,
statistics, the paper's analyses and the end-to-end study behind `prunekit safety`."""

from prunekit.safety.config import SafetyConfig
from prunekit.safety.data import Prompt, Task, Template, build_prompts, load_suite, read_tasks, select_templates
from prunekit.safety.judges import REFUSAL_PREFIXES, ChatJudge, Judge, PrefixJudge
from prunekit.safety.results import resummarize
from prunekit.safety.run import run_study
from prunekit.safety.stats import mcnemar_exact, paired_difference, wilson
from prunekit.safety.summary import summarize_records

__all__ = [
    "REFUSAL_PREFIXES", "ChatJudge", "Judge", "PrefixJudge", "Prompt", "SafetyConfig", "Task", "Template",
    "build_prompts", "load_suite", "mcnemar_exact", "paired_difference", "read_tasks", "resummarize", "run_study",
    "select_templates", "summarize_records", "wilson",
]
