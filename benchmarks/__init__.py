"""Performance benchmarks of secvec (`make bench-perf`); see docs/PERFORMANCE.md."""
