"""`earkit erase`: fine-tune a Janus model to erase a concept, or with no --model, the ShapesWorld
demonstration, measured before and after. The training flags are derived from EraseConfig's fields
(earkit/cli/arguments.py): each field's metadata is its flag's help."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from earkit.cli.arguments import add_config_arguments, config_fields, none_is_a_value
from earkit.engine.trainer import EraseConfig

# The EraseConfig fields that are not `earkit erase` flags of their own: --model and --out have
# other defaults and help (no --model is the ShapesWorld default), --resume and --force are actions.
NOT_DERIVED = ("model", "out", "resume", "force")
# The EraseConfig fields that have a flag (the flag is the field with - for _), in the dataclass's order.
ERASE_FLAGS = tuple(field.name for field in dataclasses.fields(EraseConfig) if field.name not in NOT_DERIVED)
# The training fields among them: all but what to erase (concept and anchor, passed on their own).
ERASE_FLAG_FIELDS = tuple(name for name in ERASE_FLAGS if name not in ("concept", "anchor"))
# Flags whose None is a value of its own ("none" on the command line): given when spelt out.
OPTIONAL_VALUE_FLAGS = tuple(field.name for field in config_fields(EraseConfig, ERASE_FLAGS) if none_is_a_value(field))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every training flag defaults to None (not given), so that each path knows what the user
    asked for: EraseConfig's defaults with --model, ShapesWorld's own without it, the
    checkpoint's with --resume. The help states the defaults."""
    from earkit.engine.shapesworld import SHAPESWORLD_ERASE

    def defaults_note(name: str) -> str:
        """ShapesWorld's own default where it differs, and that --resume keeps the checkpoint's."""
        notes = []
        if name in SHAPESWORLD_ERASE and SHAPESWORLD_ERASE[name] != getattr(EraseConfig, name):
            notes.append(f"{SHAPESWORLD_ERASE[name]} for the ShapesWorld default")
        if getattr(EraseConfig, name) not in (None, False):
            notes.append("with --resume, the checkpoint's")
        return "; ".join(notes)

    parser.add_argument("--model", default=None,
                        help="Janus model folder or hub id (e.g. deepseek-community/Janus-Pro-1B); default: the "
                             "shipped ShapesWorld, erasing circle (-> square), evaluated before and after")
    parser.add_argument("--out", default=EraseConfig.out,
                        help="output folder: checkpoint/ and metrics.json (default: %(default)s)")
    add_config_arguments(parser, EraseConfig, ERASE_FLAGS, defaults_note=defaults_note)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its "
                                                              "settings (a flag given again must not change them)")
    parser.add_argument("--force", action="store_true", help="start over in an --out that an earlier run wrote")
    parser.add_argument("--eval-images", type=int, default=100,
                        help="ShapesWorld default only: images per shape measured before and after (default: %(default)s)")


def given_erase_fields(args, argv) -> dict:
    """The EraseConfig fields the command line set, and only those."""
    spelt = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    given = {}
    for name in ERASE_FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None or (name in OPTIONAL_VALUE_FLAGS and "--" + name.replace("_", "-") in spelt):
            given[name] = tuple(value) if name == "trainable" else value
    return given


def resumed_erase_fields(out: str) -> dict:
    """The erase config recorded by the checkpoint in OUT/checkpoint (what --resume continues)."""
    from earkit.engine.checkpoint import checked_checkpoint_folder, read_checkpoint_record

    folder = Path(out).expanduser() / "checkpoint"
    try:
        folder = checked_checkpoint_folder(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--resume: nothing to resume in {out} ({error})") from None
    saved = read_checkpoint_record(folder)["config"].get("erase")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: checkpoint {folder} records no erase config")
    if isinstance(saved.get("trainable"), list):
        saved["trainable"] = tuple(saved["trainable"])
    return saved


def run(args) -> None:
    from earkit.engine.model import check_device
    from earkit.engine.trainer import erase

    given = given_erase_fields(args, args.argv)
    check_device(given.get("device"))  # before anything loads
    if args.model is None:
        return run_default_erase(args, given)
    if args.eval_images != 100:
        raise ValueError("--eval-images applies to the ShapesWorld default only (no --model); measure a Janus "
                         "erasure with earkit eval")
    fields = dict(model=args.model, out=args.out, concept=args.concept, anchor=args.anchor)
    if args.resume:
        saved = resumed_erase_fields(args.out)
        known = {field.name for field in dataclasses.fields(EraseConfig)}
        fields = {**{k: v for k, v in saved.items() if k in known}, **{k: v for k, v in fields.items() if v is not None}}
        fields["out"] = args.out
    config = EraseConfig(**{**fields, **given, "resume": args.resume, "force": args.force})
    result = erase(config)
    last = result.losses[-1] if result.losses else float("nan")
    print(f"erased: {result.steps} steps ({result.optimizer_steps} optimizer steps) in {result.seconds:.1f} s, "
          f"last loss {last:.4f}; checkpoint {result.checkpoint}")


# Flags the ShapesWorld default cannot honour: it makes its own pairs and preserve prompts, and
# its 7 MB generator has nothing to gain from 8-bit weights.
DEFAULT_ERASE_REFUSES = {"pairs": "--pairs", "preserve": "--preserve", "load_in_8bit": "--load-in-8bit"}


def run_default_erase(args, given: dict) -> None:
    """`earkit erase` with no model: the ShapesWorld demonstration, measured before and after.
    Every training flag applies to it (over ShapesWorld's own defaults); --resume continues it."""
    from earkit.engine import shapesworld

    refused = [flag for name, flag in DEFAULT_ERASE_REFUSES.items() if name in given]
    if refused:
        raise ValueError(f"{', '.join(refused)} needs --model: the ShapesWorld default makes its own prompt pairs "
                         "and preserves the other shapes itself")
    settings = {}
    concept, anchor, seed = args.concept, args.anchor, given.pop("seed", None)
    if args.resume:
        saved = resumed_erase_fields(args.out)
        settings = {name: saved[name] for name in ERASE_FLAG_FIELDS if name in saved and name not in DEFAULT_ERASE_REFUSES
                    and name != "seed"}
        concept, anchor = concept or saved.get("concept"), anchor or saved.get("anchor")
        seed = saved.get("seed") if seed is None else seed
    report = shapesworld.erase_and_evaluate(
        out=args.out, concept=concept or shapesworld.DEFAULT_CONCEPT, anchor=anchor or shapesworld.DEFAULT_ANCHOR,
        seed=0 if seed is None else seed, force=args.force, resume=args.resume, n_per_shape=args.eval_images,
        **{**settings, **given},
    )
    print(report)
