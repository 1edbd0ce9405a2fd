"""Benchmarks: each module has a `run(...) -> dict` that the `flywheel bench` commands print/save as JSON."""
