"""Benchmarks that need a GPU; ``bench/gpu/run.sh`` runs them all in one prepared call."""
