"""SkyPrompt benchmarks: `python -m bench.run` (or `make bench`); see bench/README.md."""
