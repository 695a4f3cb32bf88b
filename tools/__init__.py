"""Data preparation and analysis tools; run as scripts (python tools/NAME.py), imported only by tests and benchmarks."""
