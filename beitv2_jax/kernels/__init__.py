"""Pallas kernels that keep the math of the XLA path they replace; each is tested against its explicit
reference in interpret mode (tests/test_kernels.py) and measured on a GPU by benchmarks/kernels.py."""
