"""Benchmarks behind ``rf bench ...``: each prints a table and can write JSON."""
