"""Overhead of ``torchsam.SAM`` against the reference PyTorch SAM, on CPU, in one process.

A thin wrapper: the benchmark lives in :mod:`torchsam.experiments.bench` (also run by
``torchsam bench``), which documents its contenders, scenarios and targets. Run it as
``python benchmarks/bench_overhead.py`` (``--quick`` for a short smoke run, ``--threads N`` for
the intra-op thread count, 1 by default). It prints a report and always exits with status 0.
"""

import sys

from torchsam.experiments.bench import main

if __name__ == "__main__":
    main()
    sys.exit(0)
