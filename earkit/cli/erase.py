"""`earkit erase`: fine-tune a Janus model to erase a concept, or with no --model, the ShapesWorld
demonstration, measured before and after. The training flags are derived from EraseConfig's fields
(earkit/cli/arguments.py): each field's metadata is its flag's help.

Under torchrun one erasure trains on every rank (each takes its share of every step's rows;
rank 0 writes and prints). `--concepts SPEC` runs several erasures instead, one per concept, each
into OUT/<concept> and whole on one rank (concept k on rank k % WORLD_SIZE), with no process group.
"""

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
    from earkit.engine.shapesworld.erase import SHAPESWORLD_LORA_LR

    def defaults_note(name: str) -> str:
        """ShapesWorld's own default where it differs, and that --resume keeps the checkpoint's."""
        notes = []
        if name in SHAPESWORLD_ERASE and SHAPESWORLD_ERASE[name] != getattr(EraseConfig, name):
            notes.append(f"{SHAPESWORLD_ERASE[name]} for the ShapesWorld default")
        if name == "lr":
            notes.append(f"{SHAPESWORLD_LORA_LR:g} for the ShapesWorld default with --adapter lora")
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
    parser.add_argument("--concepts", default=None, metavar="SPEC",
                        help="several erasures, one run each into OUT/<concept>: a comma list of concept:anchor (with "
                             "the ShapesWorld default a concept alone takes square, or circle for square), or a file: "
                             ".txt lines concept:anchor, or .jsonl/.csv records with concept and anchor fields; under "
                             "torchrun concept k runs on rank k %% WORLD_SIZE")
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
    """The erase config recorded by the checkpoint in OUT/checkpoint (what --resume continues).
    Under torchrun rank 0 reads it and hands it to the others (ranks share no filesystem)."""
    from earkit.engine.distributed import main_decides

    return main_decides(lambda: read_resumed_erase_fields(out),
                        "rank 0 reading the settings of the checkpoint to resume")


def read_resumed_erase_fields(out: str) -> dict:
    from earkit.engine.checkpoint import checked_checkpoint_folder, read_checkpoint_record

    folder = Path(out).expanduser() / "checkpoint"
    try:
        folder = checked_checkpoint_folder(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--resume: nothing to resume in {out} ({error})") from None
    saved = read_checkpoint_record(folder)["config"].get("erase")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: checkpoint {folder} records no erase config")
    for name in ("trainable", "concept", "anchor"):
        if isinstance(saved.get(name), list):
            saved[name] = tuple(saved[name])
    return saved


def one_or_several(values):
    """A repeatable flag's values as EraseConfig takes them: None, one string, or a tuple of several."""
    if values is None or isinstance(values, str):
        return values
    return values[0] if len(values) == 1 else tuple(values)


def run(args) -> None:
    from earkit.engine.model import check_device

    args.concept, args.anchor = one_or_several(args.concept), one_or_several(args.anchor)
    given = given_erase_fields(args, args.argv)
    check_device(given.get("device"))  # before anything loads
    if args.concepts is not None:
        return run_concepts(args, given)
    if args.model is None:
        print(run_default_erase(args, given).report())
        return
    result = run_model_erase(args, given)
    last = result.losses[-1] if result.losses else float("nan")
    print(f"erased: {result.steps} steps ({result.optimizer_steps} optimizer steps) in {result.seconds:.1f} s, "
          f"last loss {last:.4f}; checkpoint {result.checkpoint}")


def run_model_erase(args, given: dict, progress: bool = True):
    """The erasure of a Janus model (--model): its EraseResult."""
    from earkit.engine.trainer import erase

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
    return erase(config, progress=progress)


# Flags the ShapesWorld default cannot honour: it makes its own pairs and preserve prompts, and
# its 7 MB generator has nothing to gain from 8-bit weights.
DEFAULT_ERASE_REFUSES = {"pairs": "--pairs", "preserve": "--preserve", "load_in_8bit": "--load-in-8bit"}


def check_default_erase_flags(given: dict) -> None:
    refused = [flag for name, flag in DEFAULT_ERASE_REFUSES.items() if name in given]
    if refused:
        raise ValueError(f"{', '.join(refused)} needs --model: the ShapesWorld default makes its own prompt pairs "
                         "and preserves the other shapes itself")


def run_default_erase(args, given: dict, progress: bool = True):
    """`earkit erase` with no model: the ShapesWorld demonstration, measured before and after (a
    shapesworld ShapesWorldErasure). Every training flag applies to it (over ShapesWorld's own
    defaults); --resume continues it."""
    from earkit.engine import shapesworld
    from earkit.engine.shapesworld.erase import default_anchor, erase_and_measure

    check_default_erase_flags(given)
    given = dict(given)
    settings = {}
    concept, anchor, seed = args.concept, args.anchor, given.pop("seed", None)
    if args.resume:
        saved = resumed_erase_fields(args.out)
        settings = {name: saved[name] for name in ERASE_FLAG_FIELDS if name in saved and name not in DEFAULT_ERASE_REFUSES
                    and name != "seed"}
        concept, anchor = concept or saved.get("concept"), anchor or saved.get("anchor")
        seed = saved.get("seed") if seed is None else seed
    concept = concept or shapesworld.DEFAULT_CONCEPT
    return erase_and_measure(
        out=args.out, concept=concept, anchor=anchor or default_anchor(concept),
        seed=0 if seed is None else seed, force=args.force, resume=args.resume, n_per_shape=args.eval_images,
        progress=progress, **{**settings, **given},
    )


# ---------------------------------------------------------------- --concepts: several erasures

CONCEPT_FILE_KINDS = (".txt", ".jsonl", ".csv")


def concept_slug(concept: str) -> str:
    """The folder name of a concept's run: lowercase, every run of non-alphanumerics one '-'."""
    slug = "".join(character if character.isalnum() else "-" for character in concept.lower())
    return "-".join(part for part in slug.split("-") if part)


def read_concept_file(path: Path) -> list[tuple[str, str | None, str]]:
    """(concept, anchor or None, where) of each entry of a --concepts file."""
    import csv
    import json

    kind = path.suffix.lower()
    if kind not in CONCEPT_FILE_KINDS:
        raise ValueError(f"--concepts file {path}: give a .txt (concept:anchor lines), .jsonl or .csv file "
                         f"(records with concept and anchor), not {path.suffix or 'a file without a suffix'}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--concepts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--concepts file {path} cannot be read ({error})") from None
    entries = []
    if kind == ".txt":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append(split_concept(line, f"{path}:{number}"))
        return entries
    if kind == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}:{number}"))
            except ValueError as error:
                raise ValueError(f"--concepts file {path}:{number}: not a JSON record ({error})") from None
    else:
        try:
            reader = csv.DictReader(text.splitlines())
            records = [(row, f"{path}:{reader.line_num}") for row in reader]
        except csv.Error as error:
            raise ValueError(f"--concepts file {path}: not a CSV file ({error})") from None
        if reader.fieldnames is None or "concept" not in reader.fieldnames:
            raise ValueError(f"--concepts file {path}: its header names no 'concept' column")
    for record, where in records:
        if not isinstance(record, dict) or not isinstance(record.get("concept"), str):
            raise ValueError(f"--concepts file {where}: a record needs a 'concept' string field")
        anchor = record.get("anchor")
        if anchor is not None and not isinstance(anchor, str):
            raise ValueError(f"--concepts file {where}: 'anchor' must be a string, got {anchor!r}")
        entries.append((record["concept"].strip(), anchor.strip() if anchor and anchor.strip() else None, where))
    return entries


def split_concept(item: str, where: str) -> tuple[str, str | None, str]:
    parts = [part.strip() for part in item.split(":")]
    if len(parts) > 2:
        raise ValueError(f"--concepts: {where} {item.strip()!r} has more than one ':' (write concept:anchor)")
    return parts[0], (parts[1] or None) if len(parts) == 2 else None, where


def parse_concepts(spec: str, shapes_world: bool) -> list[tuple[str, str]]:
    """The (concept, anchor) pairs of a --concepts SPEC, checked: ValueError naming the first bad one.
    With the ShapesWorld default a concept alone takes square (circle for square)."""
    from earkit.engine.pair_files import pairs_from_concept, same_text
    from earkit.engine.shapesworld.erase import default_anchor
    from earkit.engine.shapesworld.render import SHAPES

    path = Path(spec).expanduser()
    if path.suffix.lower() in CONCEPT_FILE_KINDS or path.is_file():
        entries = read_concept_file(path)
        if not entries:
            raise ValueError(f"--concepts file {path} names no concept")
    else:
        items = spec.split(",")
        entries = [split_concept(item, f"entry {number}") for number, item in enumerate(items, 1)]
    concepts = []
    for concept, anchor, where in entries:
        if not concept:
            raise ValueError(f"--concepts: {where} has no concept (write concept:anchor, comma-separated)")
        if anchor is None:
            if not shapes_world:
                raise ValueError(f"--concepts: {where} {concept!r} has no anchor (write {concept}:ANCHOR); only the "
                                 "ShapesWorld default picks one")
            anchor = default_anchor(concept)
        if shapes_world and (concept not in SHAPES or anchor not in SHAPES):
            raise ValueError(f"--concepts: {where}: concept and anchor must be ShapesWorld shapes {SHAPES}, got "
                             f"{concept!r}, {anchor!r}")
        if same_text(concept, anchor):
            raise ValueError(f"--concepts: {where}: concept and anchor are the same ({concept!r})")
        try:
            pairs_from_concept(concept, anchor)
        except ValueError as error:
            raise ValueError(f"--concepts: {where}: {error}") from None
        if not concept_slug(concept):
            raise ValueError(f"--concepts: {where}: {concept!r} gives no folder name (it has no letter or digit)")
        concepts.append((concept, anchor))
    seen = {}
    for concept, _ in concepts:
        slug = concept_slug(concept)
        if slug in seen:
            raise ValueError(f"--concepts: {seen[slug]!r} and {concept!r} would both write OUT/{slug}: give each "
                             "concept once")
        seen[slug] = concept
    return concepts


def run_concepts(args, given: dict) -> None:
    """--concepts: one whole erasure per concept, into OUT/<slug>; under torchrun concept k runs on
    rank k % WORLD_SIZE, alone (no process group). Each rank prints one line per concept it ran."""
    from earkit.engine import distributed

    mixed = [flag for flag, value in (("--concept", args.concept), ("--anchor", args.anchor)) if value is not None]
    mixed += ["--pairs"] if "pairs" in given else []
    if mixed:
        raise ValueError(f"--concepts names the concepts and their anchors: drop {', '.join(mixed)}")
    shapes_world = args.model is None
    if shapes_world:
        check_default_erase_flags(given)
    elif args.eval_images != 100:
        raise ValueError("--eval-images applies to the ShapesWorld default only (no --model); measure a Janus "
                         "erasure with earkit eval")
    concepts = parse_concepts(args.concepts, shapes_world)
    launched = distributed.launch_environment()
    mine = [(concept, anchor) for index, (concept, anchor) in enumerate(concepts)
            if index % launched.world_size == launched.rank]
    given = dict(given)
    device = given.get("device", "cpu" if shapes_world else None)  # the ShapesWorld default runs on the CPU
    if distributed.rank_device(device, launched) != device:
        given["device"] = distributed.rank_device(device, launched)  # each rank its own GPU
    runs = []
    for concept, anchor in mine:
        one = argparse.Namespace(**{**vars(args), "concept": concept, "anchor": anchor, "concepts": None,
                                    "out": str(Path(args.out) / concept_slug(concept))})
        if args.resume:
            resumed_erase_fields(one.out)  # every resume of this rank found before the first run starts
        runs.append(one)
    prefix = f"rank {launched.rank}: " if launched.sharded else ""
    progress = not launched.sharded  # several ranks' bars on one terminal would be noise
    for one in runs:
        if shapes_world:
            print(prefix + run_default_erase(one, given, progress=progress).line(), flush=True)
        else:
            result = run_model_erase(one, given, progress=progress)
            last = result.losses[-1] if result.losses else float("nan")
            print(f"{prefix}{one.concept} -> {one.anchor}: {result.steps} steps ({result.optimizer_steps} optimizer "
                  f"steps) in {result.seconds:.1f} s, last loss {last:.4f}; checkpoint {result.checkpoint}", flush=True)
