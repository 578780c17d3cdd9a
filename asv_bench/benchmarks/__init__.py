"""asv benchmarks for ot_agnostic (run from asv_bench/, see asv_bench/README.md)."""
