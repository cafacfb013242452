"""Speed and memory benchmarks, one script each (`python -m benchmarks.NAME`), each printing its table with the load
average; docs/performance.md lists them with the figures they back."""
