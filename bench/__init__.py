"""Reference workload, demo and benchmarks (run with ``python -m bench``)."""
