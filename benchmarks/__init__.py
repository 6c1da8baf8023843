"""What proves dist-train, beside the package and never in its wheel: `dist-train bench`
(bench.py and the figures of bench_versus.py, bench_index.py, bench_remote.py, timed with
timing.py), the plain loop it is measured against, local nginx / S3 servers for the tests and
the bench (local_servers.py), the GPU check, recipe and transfer runs, RESULTS.md."""
