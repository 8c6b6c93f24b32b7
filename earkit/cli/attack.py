"""`earkit attack`: does an erasure hold when the prompt is rephrased or optimised against it?
(earkit.ecgvf.attacks: paraphrase, white-box, ring-a-bell, each against the base and the erased model.)

    earkit attack --checkpoint runs/circle/checkpoint --concept circle --out attack-report/
    earkit attack --model FOLDER --checkpoint CKPT --benchmark kept.jsonl --attacks white-box --out attack-report/

The attacked prompts are the benchmark's target prompts (--benchmark), or, on the shipped
ShapesWorld, its evaluation prompts of the concept. The report folder holds attacks.json,
attacks-timing.json, attacks.md (= summary.md) and images/attack-NAME.png.

add_attack_arguments and attack_settings_from_args are the attack flags of this command and of
`earkit eval --attacks`, written once.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from earkit.cli.arguments import (
    add_checkpoint_argument, add_judge_argument, erasure_argument, add_sampling_arguments, check_count, optional_float,
)
from earkit.cli.pairs import add_backend_arguments, backends_from_args

ATTACK_REPORT_KIND = "attack-report"  # the manifest's kind: --force replaces only an earlier attack report
SHAPESWORLD_PROMPT_SEED = 7  # the ShapesWorld evaluation prompts' seed (evaluation_prompts(concept, n, 7))


def add_attack_arguments(parser: argparse.ArgumentParser, *, default_attacks: str | None) -> None:
    """The attack flags: which attacks (--attacks; `default_attacks`, None for none), their search
    budgets, and where the paraphrase attack's prompts come from (--paraphrases, else the pairs
    backends' flags). Every budget flag defaults to None, so that attack_settings_from_args can
    tell a flag given from its default (eval refuses attack flags without --attacks)."""
    from earkit.ecgvf.attacks import ATTACKS, AttackSettings

    defaults = AttackSettings()
    group = parser.add_argument_group(
        "attacks", "adversarial prompts against the erasure (earkit.ecgvf.attacks); the paraphrase attack asks "
                   "the --backend flags' backends unless --paraphrases gives its prompts")
    shown = "all" if default_attacks == "all" else "none"
    group.add_argument("--attacks", default=default_attacks,
                       help=f"all, or a comma list of {', '.join(ATTACKS)} (default: {shown})")
    group.add_argument("--attack-tokens", type=int, default=None,
                       help=f"tokens each search chooses per prompt (default: {defaults.n_tokens})")
    group.add_argument("--attack-steps", type=int, default=None,
                       help="white-box optimiser steps; Ring-A-Bell: search steps, each setting one token "
                            f"position of every prompt (default: {defaults.steps})")
    group.add_argument("--attack-seconds", type=optional_float, default=None,
                       help="a cap on each search's seconds; a search it cuts short is no longer reproducible "
                            "(default: none)")
    group.add_argument("--attack-strength", type=float, default=None,
                       help="Ring-A-Bell: how far along the concept direction the target state lies "
                            f"(default: {defaults.strength:g})")
    group.add_argument("--attack-seed", type=int, default=None,
                       help=f"the searches' seed: their starting tokens, the white-box targets (default: {defaults.seed})")
    group.add_argument("--paraphrases", default=None,
                       help="a file of paraphrase prompts (earkit pairs --paraphrase, or .txt one a line) "
                            "(default: ask the backends)")
    add_backend_arguments(group, device=False)


# The flags that mean nothing without an attack to shape (the backend flags only those whose
# default is None: --timeout and --api-key-env have values of their own).
BUDGET_FLAGS = {"attack_tokens": "--attack-tokens", "attack_steps": "--attack-steps",
                "attack_seconds": "--attack-seconds", "attack_strength": "--attack-strength",
                "attack_seed": "--attack-seed"}
PARAPHRASE_FLAGS = {"paraphrases": "--paraphrases"}
BACKEND_FLAGS = {"backend": "--backend", "openai_url": "--openai-url", "openai_model": "--openai-model"}


def flags_given(args, flags: dict) -> list[str]:
    return [flag for name, flag in flags.items() if getattr(args, name, None) is not None]


def attack_settings_from_args(args, model_source):
    """The AttackSettings the flags of add_attack_arguments ask for, every value checked in one
    line naming its flag before any model loads; None when --attacks is not given (eval without
    attacks), after refusing any attack flag given without it. A flag that would be ignored (the
    budgets with paraphrase alone, --paraphrases without the paraphrase attack, --backend with
    --paraphrases) is refused too."""
    from earkit.ecgvf.attacks import AttackSettings, parse_attacks

    if args.attacks is None:
        given = flags_given(args, {**BUDGET_FLAGS, **PARAPHRASE_FLAGS, **BACKEND_FLAGS})
        if given:
            raise ValueError(f"{', '.join(given)} shape(s) the attacks: add --attacks (all, or a comma list)")
        return None
    attacks = parse_attacks(args.attacks)
    check_count(args.attack_tokens, "--attack-tokens")
    check_count(args.attack_steps, "--attack-steps")
    if args.attack_seconds is not None and not (math.isfinite(args.attack_seconds) and args.attack_seconds > 0):
        raise ValueError(f"--attack-seconds must be a finite number of seconds > 0 (or none), got {args.attack_seconds}")
    if args.attack_strength is not None and not math.isfinite(args.attack_strength):
        raise ValueError(f"--attack-strength must be a finite number, got {args.attack_strength}")
    search_flags = {name: flag for name, flag in BUDGET_FLAGS.items() if name != "attack_seed"}  # the seed seeds paraphrases too
    if attacks == ["paraphrase"] and flags_given(args, search_flags):
        raise ValueError(f"{', '.join(flags_given(args, search_flags))} shape(s) the white-box and ring-a-bell "
                         "searches, which --attacks does not choose: leave them out")
    if "paraphrase" not in attacks and flags_given(args, {**PARAPHRASE_FLAGS, **BACKEND_FLAGS}):
        raise ValueError(f"{', '.join(flags_given(args, {**PARAPHRASE_FLAGS, **BACKEND_FLAGS}))} give(s) the "
                         "paraphrase attack its prompts, which --attacks does not choose: leave them out")
    if args.paraphrases is not None and flags_given(args, BACKEND_FLAGS):
        raise ValueError(f"--paraphrases gives the paraphrase prompts; {', '.join(flags_given(args, BACKEND_FLAGS))} "
                         "would be asked for nothing: give one or the other")
    defaults = AttackSettings()
    settings = AttackSettings(
        attacks=attacks,
        n_tokens=defaults.n_tokens if args.attack_tokens is None else args.attack_tokens,
        steps=defaults.steps if args.attack_steps is None else args.attack_steps,
        seconds=args.attack_seconds,
        strength=defaults.strength if args.attack_strength is None else float(args.attack_strength),
        seed=defaults.seed if args.attack_seed is None else args.attack_seed)
    if "paraphrase" in attacks:
        if args.paraphrases is not None:
            from earkit.ecgvf.pair_generation.paraphrase import load_paraphrases

            settings.paraphrases = load_paraphrases(args.paraphrases)
        else:
            settings.backends = rank_zero_backends(args, model_source)
    settings.validate()
    return settings


def ask_paraphrases(settings, concept: str, count: int) -> None:
    """settings.ask_paraphrases on rank 0 (which alone has the backends and searches), before any
    model loads: a concept no backend can describe ends every rank alike, before the work."""
    from earkit.engine import distributed

    if settings is not None:
        distributed.main_decides(lambda: settings.ask_paraphrases(concept, count), "rank 0 asking for paraphrases")


def rank_zero_backends(args, model_source) -> list | None:
    """The paraphrase backends the flags name, built on rank 0 alone (only it searches; a
    transformers backend loads a language model), whose errors end every rank alike. None on the
    other ranks."""
    from earkit.engine import distributed

    built = []
    distributed.main_decides(lambda: built.append(paraphrase_backends(args, model_source)),
                             "rank 0's paraphrase backends")
    return built[0] if built else None


def paraphrase_backends(args, model_source) -> list:
    """backends_from_args for the model attacked: the template backend composes with the prompt
    vocabulary of the model folder (a hub id has none: generic scene templates)."""
    from earkit.ecgvf.pair_generation import model_prompt_vocabulary

    folder = Path(model_source).expanduser()
    templated = "template" in (args.backend or ["template"]) and folder.is_dir()
    return backends_from_args(args, vocabulary=model_prompt_vocabulary(folder) if templated else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="report folder: attacks.json, attacks-timing.json, attacks.md, summary.md, images/")
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    add_checkpoint_argument(parser, "the erasure checkpoint (OUT/checkpoint of earkit erase): before = the model, "
                                    "after = the model with it; without: the model alone is attacked")
    parser.add_argument("--concept", default=None, help="the erased concept (default: the benchmark's own)")
    parser.add_argument("--benchmark", default=None,
                        help="pairs file, prompt file or benchmark JSONL (as earkit eval's): its target prompts are "
                             "attacked, its preservation concepts are the anchors (default on the shipped ShapesWorld: "
                             "its evaluation prompts of --concept)")
    parser.add_argument("--anchor", action="append", default=None,
                        help="without --benchmark: what the erasure draws instead of the concept (Ring-A-Bell's "
                             "contrast); repeatable (default: square, or circle for square, as earkit erase picks; "
                             "'none': the concept is deleted instead)")
    parser.add_argument("--max-prompts", type=int, default=20, help="at most N target prompts (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2,
                        help="held-out images per attacked prompt, seeds SEED..SEED+N-1 (default: %(default)s)")
    add_judge_argument(parser)
    add_sampling_arguments(parser, seed=False, top_k_p=False)
    parser.add_argument("--seed", type=int, default=1000,
                        help="the first held-out seed; the searches never draw with these (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per sampler batch (default: %(default)s)")
    add_attack_arguments(parser, default_attacks="all")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="replace an existing attack report folder")


def check_out_folder(out: Path, force: bool) -> None:
    """Before any search: --out is free, or (with --force) an earlier attack report, and writable."""
    from earkit.io import check_replaceable, check_writable

    check_replaceable(out, force=force, kind=ATTACK_REPORT_KIND, what="attack report folder")
    check_writable(out, "attack report folder")


def attacked_prompts(args) -> tuple[str, list[str], list[str]]:
    """(concept, target prompts, anchors): the benchmark's, or the shipped ShapesWorld's evaluation
    prompts of --concept with the --anchor concepts."""
    if args.benchmark is not None:
        from earkit.ecgvf.benchmark import load_benchmark

        if args.anchor:
            raise ValueError("--anchor: with --benchmark the anchors are its preservation concepts; leave it out")
        benchmark = load_benchmark(args.benchmark, concept=args.concept, max_prompts=args.max_prompts)
        return benchmark.concept, [p.prompt for p in benchmark.target], benchmark.anchors()
    if args.model is not None:
        raise ValueError(f"--model {args.model}: give --benchmark FILE, whose target prompts are attacked (the "
                         "built-in prompts are the shipped ShapesWorld's)")
    from earkit.engine.shapesworld import render as world
    from earkit.engine.shapesworld.erase import evaluation_prompts

    if args.concept is None:
        raise ValueError(f"--concept is needed: the ShapesWorld shape erased ({', '.join(world.SHAPES)}), "
                         "or --benchmark FILE")
    concept = args.concept.strip().lower()
    if concept not in world.SHAPES:
        raise ValueError(f"--concept {args.concept!r} is not a ShapesWorld shape ({', '.join(world.SHAPES)}); "
                         "for another concept give --benchmark FILE")
    anchors = list(dict.fromkeys(anchor.strip().lower() for anchor in args.anchor or ()))
    if anchors == ["none"]:
        anchors = []
    elif not anchors:  # the anchor `earkit erase` gives a ShapesWorld concept alone
        from earkit.engine.shapesworld import DEFAULT_ANCHOR, DEFAULT_CONCEPT

        anchors = [DEFAULT_CONCEPT if concept == DEFAULT_ANCHOR else DEFAULT_ANCHOR]
    unknown = [anchor for anchor in anchors if anchor not in world.SHAPES]
    if unknown:
        raise ValueError(f"--anchor {unknown[0]!r} is not a ShapesWorld shape ({', '.join(world.SHAPES)}) or none")
    if concept in anchors:
        raise ValueError(f"--anchor {concept!r} is the concept itself")
    return concept, evaluation_prompts(concept, args.max_prompts, SHAPESWORLD_PROMPT_SEED), anchors


def write_attack_report(folder: Path, result: dict, images: dict) -> None:
    from earkit.ecgvf.attacks import write_attack_files

    write_attack_files(folder, result, images)
    shutil.copyfile(folder / "attacks.md", folder / "summary.md")


def run(args) -> dict:
    """Check everything, search the attacks, draw and judge their images, write the report atomically."""
    from earkit.ecgvf.attacks import attacks_table, run_attacks
    from earkit.ecgvf.images import resolve_checkpoint, resolve_model
    from earkit.ecgvf.judges import parse_judge
    from earkit.engine.model import check_device
    from earkit.engine.sampler import check_sampling_arguments, resolve_source_sampling
    from earkit.io import write_folder_atomically

    out = Path(args.out).expanduser()
    check_out_folder(out, args.force)
    for value, name in ((args.seeds, "--seeds"), (args.batch_size, "--batch-size"), (args.max_prompts, "--max-prompts")):
        check_count(value, name)
    model_source = resolve_model(args.model)
    checkpoint = resolve_checkpoint(erasure_argument(args))
    concept, prompts, anchors = attacked_prompts(args)
    device = str(check_device(args.device))
    guidance_scale, temperature = resolve_source_sampling(model_source, args.guidance_scale, args.temperature)
    check_sampling_arguments(guidance_scale, temperature, None, None)
    settings = attack_settings_from_args(args, model_source)
    ask_paraphrases(settings, concept, len(prompts))
    judge = parse_judge(args.judge, model_folder=model_source, device=device, labels=[concept] + anchors)
    seeds = list(range(args.seed, args.seed + args.seeds))
    result, images = run_attacks(model_source, checkpoint=checkpoint, concept=concept, prompts=prompts,
                                 judge=judge, settings=settings, seeds=seeds, guidance_scale=guidance_scale,
                                 temperature=temperature, batch_size=args.batch_size, device=device,
                                 dtype=args.dtype, anchors=anchors, progress=not args.quiet)
    write_folder_atomically(out, lambda partial: write_attack_report(partial, result, images), force=args.force,
                            kind=ATTACK_REPORT_KIND, what="attack report folder")
    print(attacks_table(result))
    print(f"wrote {out / 'attacks.json'}, {out / 'summary.md'} and {out / 'images'}")
    return result
