"""`earkit export`: write an erasure checkpoint as a full model folder (from_pretrained loads it)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model the checkpoint was trained from")
    parser.add_argument("--checkpoint", required=True, help="an erasure checkpoint folder (OUT/checkpoint)")
    parser.add_argument("--out", required=True, help="the full model folder to write (from_pretrained loads it)")
    parser.add_argument("--dtype", default=None, help="dtype of the exported weights (default: the base model's)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export by earkit (never another folder, the base model's least of all)")


def run(args) -> None:
    from earkit.engine.checkpoint import export_checkpoint

    path = export_checkpoint(args.model, args.checkpoint, args.out, force=args.force, dtype=args.dtype)
    print(f"exported to {path}")
