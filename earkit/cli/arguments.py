"""Arguments shared by several commands, and flags derived from the config dataclasses, so that
a field's flag, type, default and help are written once (on the field) and cannot drift."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
import warnings
from typing import Callable, Iterable


def optional_float(text: str) -> float | None:
    """A number, or "none" for a field whose None means something of its own."""
    return None if text.lower() == "none" else float(text)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def none_is_a_value(field: dataclasses.Field) -> bool:
    """Whether the field's None means something ("none" on the command line); its metadata
    says what, under "none"."""
    return "none" in field.metadata


def config_fields(config_class, names: Iterable[str]) -> list[dataclasses.Field]:
    by_name = {field.name: field for field in dataclasses.fields(config_class)}
    return [by_name[name] for name in names]


def _argument_type(annotation) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a field annotation such as `float | None`;
    `str | tuple[str, ...]` (one value or several) is the tuple: a repeatable flag."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(inner) == 2 and str in inner and any(typing.get_origin(arg) is tuple for arg in inner):
            inner = [arg for arg in inner if arg is not str]
        if len(inner) != 1:
            raise TypeError(f"cannot derive a flag from {annotation}")
        return inner[0], True
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser, config_class, names: Iterable[str], *,
                         defaults_note: Callable[[str], str] | None = None) -> None:
    """One flag per field of `config_class` in `names`, derived from the dataclass:

    - the flag is the field's name with - for _;
    - the type comes from the annotation: int, float, str; bool -> store_true; tuple[str, ...] ->
      a repeatable flag (append); a field whose None means something (metadata "none") accepts "none";
    - every flag defaults to None (not given), so a caller can tell what the user asked for;
    - the help is metadata["help"], then the dataclass default (or metadata["default"], a text
      that replaces it), then `defaults_note(name)`, then what "none" means; metadata["choices"]
      restricts the values.
    """
    hints = typing.get_type_hints(config_class)
    instance_defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
    for field in config_fields(config_class, names):
        meta = field.metadata
        kind, _ = _argument_type(hints[field.name])
        default = instance_defaults[field.name]
        notes = []
        if "default" in meta:
            notes.append(f"default: {meta['default']}")
        elif default is None and none_is_a_value(field):
            notes.append("default: none")
        elif default is not None and default is not dataclasses.MISSING and kind is not bool:
            shown = ", ".join(default) if isinstance(default, tuple) else default
            notes.append(f"default: {shown}")
        note = defaults_note(field.name) if defaults_note else ""
        if note:
            notes.append(note)
        if none_is_a_value(field):
            notes.append(f"none: {meta['none']}")
        help_text = meta.get("help", "")
        if notes:
            help_text = f"{help_text} ({'; '.join(notes)})" if help_text else "; ".join(notes)
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        options = dict(default=None, help=help_text)
        if kind is bool:
            options["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            options["action"] = "append"
        elif none_is_a_value(field):
            options["type"] = optional_float if kind is float else _optional(kind)
        elif kind is not str:
            options["type"] = kind
        if "choices" in meta:
            options["choices"] = meta["choices"]
        parser.add_argument(flag_name(field.name), dest=field.name, **options)


def _optional(kind: type) -> Callable[[str], object]:
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = f"optional_{kind.__name__}"
    return parse


def add_sampling_arguments(parser: argparse.ArgumentParser, *, seed: bool = True, top_k_p: bool = True) -> None:
    """The sampler's flags, one spelling for every command that draws images: --seed (the first
    seed), --guidance-scale, --temperature, --top-k and --top-p, --dtype, --device. Guidance and
    temperature default to None: the command resolves them from the model (the sampler's
    resolve_source_sampling)."""
    from earkit.engine.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_TEMPERATURE

    if seed:
        parser.add_argument("--seed", type=int, default=0, help="the first seed (default: %(default)s)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help=f"CFG scale (default: the model's generation_config.json, else {DEFAULT_GUIDANCE_SCALE:g})")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature, 0 = greedy (default: the model's generation_config.json, else "
                             f"{DEFAULT_TEMPERATURE:g})")
    if top_k_p:
        parser.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens only (default: all)")
        parser.add_argument("--top-p", type=float, default=None,
                            help="sample from the smallest set of likeliest tokens whose probability reaches p (default: all)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32 (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")


def check_count(value, name: str) -> None:
    """A count flag (None: not given) is at least 1."""
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


JUDGE_DEFAULT = "default: the judge the model folder's earkit.json names"


def add_judge_argument(parser: argparse.ArgumentParser) -> None:
    """--judge: a judge form; unset, the one the model folder names (earkit.ecgvf.judges.default_judge)."""
    from earkit.ecgvf.judges import JUDGE_FORMS

    parser.add_argument("--judge", default=None, help=f"{JUDGE_FORMS} ({JUDGE_DEFAULT})")


def add_checkpoint_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """--checkpoint, an erasure checkpoint folder (its old name --delta still works, hidden), or
    --adapter, LoRA adapter folders stacked with --adapter-weight: erasure_argument reads them."""
    parser.add_argument("--checkpoint", default=None,
                        help=f"{help_text}; an `--adapter lora` run's checkpoint, or any PEFT LoRA folder, is applied "
                             "as its merged weights")
    add_old_name(parser, "--delta", "--checkpoint")
    parser.add_argument("--adapter", action="append", default=None, metavar="FOLDER",
                        help="a LoRA adapter folder (PEFT's, or an `earkit erase --adapter lora` run's checkpoint) to "
                             "apply in place of --checkpoint; repeat it to stack several (peft's add_weighted_adapter, "
                             "'cat': their weighted deltas add up)")
    parser.add_argument("--adapter-weight", action="append", type=float, default=None, metavar="W",
                        help="the weight of each --adapter, in order (default: 1 each)")


def erasure_argument(args):
    """What --checkpoint / --adapter / --adapter-weight name: None, a folder, or an
    adapters.AdapterStack (several adapters, or one with a weight). ValueError when they clash."""
    from pathlib import Path

    from earkit.engine.adapters import AdapterStack

    adapters, weights = getattr(args, "adapter", None), getattr(args, "adapter_weight", None)
    if adapters and args.checkpoint is not None:
        raise ValueError("give --checkpoint or --adapter, not both (an adapter is applied in place of a checkpoint)")
    if weights and not adapters:
        raise ValueError("--adapter-weight weighs --adapter folders: give the --adapter folders too")
    if not adapters:
        return args.checkpoint
    if weights and len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} --adapter-weight for {len(adapters)} --adapter: give one weight per adapter")
    if len(adapters) == 1 and not weights:
        return Path(adapters[0]).expanduser()
    return AdapterStack(tuple(adapters), tuple(weights or ()))


def add_old_name(parser: argparse.ArgumentParser, old_flag: str, new_flag: str, **options) -> None:
    """A flag's previous spelling, hidden from --help (a separate flag: argparse cannot hide one
    spelling of a flag). take_old_names puts its value under the new flag, with a warning."""
    dest = "old_" + old_flag.lstrip("-").replace("-", "_")
    parser.add_argument(old_flag, dest=dest, default=None, help=argparse.SUPPRESS, **options)
    parser.set_defaults(old_names=(*(parser.get_default("old_names") or ()), (old_flag, new_flag, dest)))


def take_old_names(args) -> None:
    """Each old spelling given (add_old_name) sets its new flag's value, with a one-line
    FutureWarning; ValueError when both spellings are given."""
    spelt = {token.split("=", 1)[0] for token in getattr(args, "argv", ()) if token.startswith("--")}
    for old_flag, new_flag, dest in getattr(args, "old_names", ()):
        value = getattr(args, dest)
        if value is None:
            continue
        if new_flag in spelt:
            raise ValueError(f"{old_flag} is the old name of {new_flag}: give {new_flag} only")
        warnings.warn(f"{old_flag} is deprecated: it is {new_flag} now", FutureWarning, stacklevel=2)
        setattr(args, new_flag.lstrip("-").replace("-", "_"), value)
