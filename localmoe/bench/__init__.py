"""Benchmarks: speed against llama.cpp and kernel micro-benchmarks, residency strategies and trace
replay, and random-weight models shaped like real ones."""
