"""Comparison report over pruning runs: Markdown + an offline HTML page with matplotlib plots."""

from prunekit.report.build import build_report, collect_runs

__all__ = ["build_report", "collect_runs"]
