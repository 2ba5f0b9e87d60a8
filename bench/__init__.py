"""Benchmark harness for the KSI daemon: each figure measured side by side with its floor.

Run ``./scripts/bench`` (full) or ``./scripts/bench-smoke`` (tiny repetition counts, CI);
see ``bench/README.md`` for what each benchmark measures and how to add one.
"""
