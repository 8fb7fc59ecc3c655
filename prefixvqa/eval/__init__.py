"""Evaluation for prefixvqa: ``metrics`` (pure metric functions), ``protocols`` (named protocols, the metric
registry, answering plans, breakdowns), ``runner`` (evaluate, fit a calibration), ``reports`` (the result folder's
JSON and markdown, rescoring, comparison), ``plots`` (its figures) and ``errors``. Answering itself is
`prefixvqa.inference`'s.

Kept import-light on purpose: submodules are imported explicitly, and heavy libraries load only inside the functions
that need them.
"""
