"""Benchmarks and reference implementations that dnl_zoo is measured against."""
