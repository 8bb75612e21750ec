"""Command line: ``python -m genfast demo [--quick]``, ``python -m genfast bench [OPS] [--quick]``,
``python -m genfast info`` and ``python -m genfast compile-check [--arch 80,90] [--families ...] [--quick]``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="genfast", description="Fast kernels for generative models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, and which backends can run here")
    demo = sub.add_parser("demo", help="train a DDPM and a GAN on real digits, sample, time fast vs reference")
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    bench = sub.add_parser("bench", help="benchmark ops against their baselines")
    from .bench.cli import add_arguments

    add_arguments(bench)
    check = sub.add_parser("compile-check", help="compile every Triton launch for sm_80/sm_90 (no GPU needed) "
                                                 "and report registers, spills and shared memory")
    from .compile_check import add_arguments as add_check_arguments

    add_check_arguments(check)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
        return 0
    if args.command == "demo":
        from .demo import run as run_demo

        return run_demo(args)
    if args.command == "compile-check":
        from .compile_check import run as run_check

        return run_check(args)
    from .bench.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
