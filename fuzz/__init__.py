"""Fuzzers: run from the repository root as ``python -m fuzz.<name>``."""
