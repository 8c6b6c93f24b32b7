"""`earkit bench ...`: the benchmarks, passed through to `python -m earkit.bench`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="bench arguments, e.g. kernels --quick")


def run(args) -> None:
    from earkit.bench.__main__ import main as bench_main

    bench_main(args.rest)
