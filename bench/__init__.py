"""Benchmarks for the accelerator daemon: deterministic datasets, a daemon harness, ingest figures."""
