"""Side-by-side benchmarks of kvservice against redis-server and etcd (issue 4).

`python -m bench.run` runs everything and writes bench/results/latest.md;
`python -m bench.run --smoke` runs the same code paths with tiny counts.
"""
