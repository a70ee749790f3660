"""Benchmarks of flexora_jax: one runner per figure, a shared timing harness, and the RESULTS.md report.

Run everything with ``python -m benchmarks.run_all`` (see ``benchmarks/RESULTS.md``); each runner is also
a module with ``run(smoke=False, out_dir=...) -> dict`` and a command line (``python -m benchmarks.finetune``).
"""
