"""flexwalk's benchmarks: a pytest-benchmark suite (test_*.py, shapes and devices in conftest.py)
and the GPU report (`python -m benchmarks.report --out DIR`, `make bench-gpu`)."""
