"""Tests of the benchmark grid (anomalib_zsad.benchmark)."""
