"""Evaluation for prefixvqa: metrics (``prefixvqa.eval.metrics``), protocols and reports.

Kept import-light on purpose: submodules are imported explicitly, and heavy libraries load only inside the functions
that need them.
"""
