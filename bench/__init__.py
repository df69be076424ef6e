"""Benchmarks (issue 7): each module runs with ``python -m bench.<name> [--quick]``.

Every benchmark measures elmforest and its baseline in the same run and reports ratios; results
go to ``bench/results/<name>.json`` and plots to ``docs/img/``. See docs/benchmarks.md.
"""
