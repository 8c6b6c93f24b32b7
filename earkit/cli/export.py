"""`earkit export`: write an erasure checkpoint as a full model folder (from_pretrained loads it)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="the base model the checkpoint was trained from (default: the one it records)")
    parser.add_argument("--checkpoint", required=True,
                        help="an erasure checkpoint folder (OUT/checkpoint), or with --merge a LoRA adapter folder (an "
                             "`earkit erase --adapter lora` run's checkpoint, or any PEFT LoRA folder)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the LoRA adapter --checkpoint names into the weights it adapts (needed for an "
                             "adapter: without it, load the adapter folder itself with PEFT)")
    parser.add_argument("--out", required=True, help="the full model folder to write (from_pretrained loads it)")
    parser.add_argument("--dtype", default=None, help="dtype of the exported weights (default: the base model's)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export by earkit (never another folder, the base model's least of all)")


def run(args) -> None:
    from earkit.engine.checkpoint import export_checkpoint

    path = export_checkpoint(args.model, args.checkpoint, args.out, force=args.force, dtype=args.dtype,
                              merge=args.merge)
    print(f"exported to {path}")
