"""Benchmarks of cs336_systems components (timed on a GPU; reports rendered anywhere)."""
