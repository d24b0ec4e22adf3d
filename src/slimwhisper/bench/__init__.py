"""Benchmarks of what compression buys: KV memory, decode speed, encoder speed, end-to-end throughput."""
