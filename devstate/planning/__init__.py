"""The plan and the cost model: which worker does what in which order, the expected
downtime and its critical path, the order streams take the host's bandwidth.

Pure functions of configuration and measured costs; runs in the coordinator (and in
benchmarks). May import config and errors; never the runtime.
"""
