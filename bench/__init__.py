"""Benchmarks: programs that measure and print, run by `make bench-*` targets (not tests)."""
