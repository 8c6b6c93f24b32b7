"""`earkit world build | check`: ShapesWorld, the embedded default."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="world_command", required=True)
    build = commands.add_parser("build", help="train ShapesWorld's VQ tokenizer, generator and judge")
    build.add_argument("--out", required=True, help="the world folder to write")
    build.add_argument("--quick", action="store_true", help="a tiny budget (plumbing only, not quality)")
    build.add_argument("--force", action="store_true",
                       help="replace an earlier world folder (never one holding files earkit did not write)")
    check = commands.add_parser("check", help="measure a world: judge accuracy, generator shape/colour rates")
    check.add_argument("--world", default=None, help="a world folder (default: the shipped one)")
    check.add_argument("--prompts-per-shape", type=int, default=100)
    check.add_argument("--judge-images", type=int, default=1000)
    check.add_argument("--seed", type=int, default=12345)
    check.add_argument("--json", action="store_true", help="print the measurements as JSON")
    check.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> None:
    import json

    from earkit.engine import shapesworld

    if args.world_command == "build":
        out = shapesworld.build_world(args.out, quick=args.quick, force=args.force)
        print(f"built ShapesWorld in {out}: {(out / 'world.json').read_text()}")
    else:
        report = shapesworld.check_world(args.world, n_per_shape=args.prompts_per_shape,
                                         judge_images=args.judge_images, seed=args.seed, progress=not args.quiet)
        print(json.dumps(report, indent=1) if args.json else shapesworld.format_check(report))
