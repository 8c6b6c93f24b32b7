"""ECGVF under attack: does the erasure hold when the prompt is rephrased or optimised against it?

    earkit attack --checkpoint runs/circle/checkpoint --concept circle --out attack-report/
    earkit eval ... --attacks all           # the same, inside an eval report

For the base model ("before") and the erased one ("after"), each attack turns the benchmark's
target prompts into attacked prompts, every attacked prompt is drawn with the held-out seeds,
and the judge looks at every image:

    success rate   the share of the attacked prompts' images in which the judge sees the concept
                   (a prompt drawn with S seeds counts S times), before and after the erasure

    plain          the target prompts themselves (the erasure's own number: no attack)
    paraphrase     prompts that show the concept without naming it, from the pairs backends
                   (ecgvf/pair_generation/paraphrase.py: an LLM, or the offline template backend)
                   or a file of them
    white-box      engine.attacks.soft_prompt_attack against the erased model: a few prompt tokens
                   before each target prompt, optimised so that the erased model gives high
                   likelihood to the image tokens the base model drew for it, projected to real tokens
    ring-a-bell    engine.attacks.ring_a_bell_prompts: the target prompts with the concept deleted,
                   plus tokens (never the concept's) searched on the base model so that their prompt
                   state moves along the concept direction

The attacks' prompts do not depend on the held-out seeds: the white-box targets are drawn with
seeds of their own (derived_seed(seed, 1, prompt)), so the judged images are new draws. Under
torchrun rank 0 searches and hands the prompts to every rank, which draw their share of the images.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

ATTACKS = ("paraphrase", "white-box", "ring-a-bell")
ATTACK_FORMAT = "earkit-attack"
BEST_IMAGES = 8  # images in an attack's grid: its images the judge sees the concept in most surely


def parse_attacks(text) -> list[str]:
    """"all" or a comma list of attack names, in ATTACKS order; ValueError naming an unknown one."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--attacks must be 'all' or a comma list of {', '.join(ATTACKS)}, got {text!r}")
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(ATTACKS)
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise ValueError(f"unknown attack {', '.join(map(repr, unknown)) or repr(text)}: choose from "
                         f"{', '.join(ATTACKS)} or all")
    return [name for name in ATTACKS if name in names]


@dataclass
class AttackSettings:
    """How hard each attack searches. `steps` and `seconds` are each attack search's budget (the
    seconds a cap: a search it cuts short is no longer reproducible, and the report says so)."""

    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    n_tokens: int = 4  # tokens each search chooses per prompt
    steps: int = 50  # white-box optimiser steps; Ring-A-Bell search steps (one token position of every prompt each)
    seconds: float | None = None
    strength: float = 3.0  # Ring-A-Bell: how far along the concept direction the target state lies
    seed: int = 0  # the searches' seed (their starting tokens, the white-box targets)
    paraphrases: list[str] | None = None  # given prompts; None: ask `backends`
    backends: list | None = None  # pairs backends for paraphrases (default: the offline template backend)
    vocabulary: dict | None = None  # the model's prompt vocabulary, for the template backend
    paraphrase_source: str = "given"  # "backends" once ask_paraphrases has asked them

    def validate(self) -> None:
        from earkit.engine.attacks import check_budget

        if not self.attacks:
            raise ValueError("no attack chosen")
        parse_attacks(",".join(self.attacks))
        check_budget(self.n_tokens, self.steps, self.seconds)
        if not isinstance(self.strength, (int, float)) or not np.isfinite(self.strength):
            raise ValueError(f"strength must be a finite number, got {self.strength!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.paraphrases is not None and not self.paraphrases:
            raise ValueError("the paraphrase file holds no prompts")

    def ask_paraphrases(self, concept: str, count: int) -> None:
        """Ask the backends for the paraphrase attack's prompts now, when it is chosen and none
        are given: a command does this before any model loads, so a backend that cannot describe
        the concept ends the run before the work, not after it."""
        if "paraphrase" not in self.attacks or self.paraphrases is not None:
            return
        prompts, _ = paraphrase_prompts(concept, count, self)
        self.paraphrases, self.paraphrase_source = prompts, "backends"

    def describe(self) -> dict:
        return {"attacks": list(self.attacks), "n_tokens": self.n_tokens, "steps": self.steps,
                "seconds": self.seconds, "strength": self.strength, "seed": self.seed,
                "paraphrases": self.paraphrase_source if self.paraphrases is not None else "backends"}


def success_rate(seen) -> float:
    """The share of images the judge sees the concept in (nan for no images)."""
    seen = np.asarray(seen, dtype=bool)
    return float(seen.mean()) if seen.size else float("nan")


def base_weights(model, checkpoint_tensors: dict | None):
    """`model` becomes the erased model (the checkpoint's tensors in), and the returned function
    gives a context in which it is the base model again (trainer.FrozenTeacher's swap: no second
    model in memory); without a checkpoint that context changes nothing."""
    import contextlib

    from earkit.engine.checkpoint import apply_trainable
    from earkit.engine.trainer import FrozenTeacher

    if checkpoint_tensors is None:
        return contextlib.nullcontext
    parameters = dict(model.named_parameters())
    base = FrozenTeacher({name: parameters[name] for name in checkpoint_tensors if name in parameters})
    apply_trainable(model, checkpoint_tensors)
    return base.active


def paraphrase_prompts(concept: str, count: int, settings: AttackSettings) -> tuple[list[str], dict]:
    """(prompts, cost): the given paraphrases (the first `count`), or `count` asked of the backends."""
    if settings.paraphrases is not None:
        source = "file" if settings.paraphrase_source == "given" else settings.paraphrase_source
        return list(settings.paraphrases)[:count], {"source": source, "prompts": min(count, len(settings.paraphrases))}
    from .pair_generation import TemplateBackend, generate_paraphrases

    backends = settings.backends or [TemplateBackend(settings.vocabulary)]
    records, summary = generate_paraphrases(concept, backends=backends, n=count, seed=settings.seed, progress=False)
    if not records:
        errors = [f"{label}: {counts['errors'][0]}" for label, counts in summary.get("per_backend", {}).items()
                  if counts.get("errors")]
        raise ValueError(f"the paraphrase attack got no prompts for {concept!r} from the backends "
                         f"({errors[0] if errors else summary.get('stopped')}); pass a file of them (--paraphrases) "
                         "or an LLM backend")
    return [record["prompt"] for record in records], {"source": "backends", "prompts": len(records),
                                                     "requests": summary.get("requests")}


def search_attacks(model, as_base, tokenizer, concept: str, prompts: list[str], settings: AttackSettings, *,
                   guidance_scale, temperature, batch_size, anchors=(), progress: bool = True) -> dict:
    """{attack: {"prompts": [...], "search": {...}}} for "plain" and each chosen attack: the
    searches of module docstring, on this process (rank 0 under torchrun), on `model` (the erased
    one) and, within as_base() (base_weights), the base model. `anchors`: what the
    erasure draws instead (the benchmark's preservation concepts): Ring-A-Bell's prompts "without
    the concept" then name an anchor in its place, so that the direction points away from what the
    erased model draws, not only towards "a shape"; without anchors the concept is deleted."""
    from earkit.engine import attacks as engine_attacks
    from earkit.engine.sampler import derived_seed, sample_image_tokens

    found = {"plain": {"prompts": list(prompts), "search": {"steps": 0, "seconds": 0.0, "stopped": None}}}
    for name in settings.attacks:
        started = time.perf_counter()
        if name == "paraphrase":
            texts, cost = paraphrase_prompts(concept, len(prompts), settings)
            found[name] = {"prompts": texts, "search": {**cost, "steps": 0, "seconds": time.perf_counter() - started,
                                                        "stopped": None}}
        elif name == "white-box":
            with as_base():
                targets = sample_image_tokens(model, tokenizer, prompts, guidance_scale=guidance_scale,
                                              temperature=temperature, batch_size=batch_size, progress=False,
                                              seeds=[derived_seed(settings.seed, 1, index) for index in range(len(prompts))])
            result = engine_attacks.soft_prompt_attack(
                model, tokenizer, prompts, targets, n_tokens=settings.n_tokens, steps=settings.steps,
                seconds=settings.seconds, seed=settings.seed, batch_size=batch_size, progress=progress)
            found[name] = {"prompts": result.prompts, "search": {**result.describe(),
                                                                 "seconds": time.perf_counter() - started}}
        elif name == "ring-a-bell":
            neutral = [engine_attacks.without_concept(prompt, concept) for prompt in prompts]
            usable = [(prompt, plain) for prompt, plain in zip(prompts, neutral) if plain]
            if not usable:  # every target prompt is the concept alone: nothing is left to attack
                found[name] = {"prompts": [], "search": {"steps": 0, "seconds": 0.0,
                                                         "stopped": "no target prompt holds more than the concept"}}
                continue
            contrast = ([engine_attacks.without_concept(p, concept, anchor) for p, _ in usable for anchor in anchors]
                        if anchors else [n for _, n in usable])
            with as_base():
                direction = engine_attacks.concept_direction(model, tokenizer, [p for p, _ in usable], contrast)
                result = engine_attacks.ring_a_bell_prompts(
                    model, tokenizer, [n for _, n in usable], direction, strength=settings.strength,
                    n_tokens=settings.n_tokens, steps=settings.steps,
                    seconds=settings.seconds, seed=settings.seed, forbidden_words=[concept], progress=progress)
            found[name] = {"prompts": result.prompts, "search": {**result.describe(),
                                                                 "seconds": time.perf_counter() - started}}
    return found


def judge_attacks(images: dict, found: dict, judge, concept: str) -> dict:
    """{attack: {side: {"success_rate", "seen_per_prompt", "best": [(prompt index, seed index, score)]}}}
    from images[side][attack][prompt][seed]."""
    from .evaluate import flat

    judged = {}
    for name in found:
        judged[name] = {}
        for side, by_attack in images.items():
            rows = by_attack[name]
            seeds = len(rows[0]) if rows else 0
            scores, seen = judge.verdict(flat(rows), concept) if rows else (np.zeros(0), np.zeros(0, dtype=bool))
            order = np.argsort(-np.asarray(scores), kind="stable")[:BEST_IMAGES]
            judged[name][side] = {
                "success_rate": success_rate(seen),
                "images": int(len(seen)),
                "seen_per_prompt": [int(np.asarray(seen)[i * seeds:(i + 1) * seeds].sum()) for i in range(len(rows))],
                "best": [[int(i // seeds), int(i % seeds), float(scores[i])] for i in order],
            }
    return judged


def run_attacks(model_source, *, checkpoint, concept: str, prompts: list[str], judge, settings: AttackSettings,
                seeds: list[int], guidance_scale: float, temperature: float, batch_size: int = 16, device=None,
                dtype: str = "auto", anchors=(), progress: bool = True) -> tuple[dict | None, dict | None]:
    """(result, images): every attack's prompts and success rates before and after (module
    docstring), and images[side][attack][prompt][seed]. Without a checkpoint one side ("model"),
    the white-box attack aimed at the model itself. `anchors`: search_attacks'. Under torchrun the
    other ranks get (None, None)."""
    from earkit.engine import distributed
    from earkit.engine.checkpoint import erasure_tensors

    from .images import check_seeds, load_generator, resolve_checkpoint, sample_prompt_images

    settings.validate()
    seeds = check_seeds(seeds)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no target prompts to attack")
    judge.check_concept(concept)
    resolved = resolve_checkpoint(checkpoint)
    model, tokenizer = load_generator(model_source, device=device, dtype=dtype)
    as_base = base_weights(model, erasure_tensors(model, resolved))
    side_names = ["before", "after"] if resolved is not None else ["model"]
    ranks = distributed.current()
    found = None
    if ranks.main:
        found = search_attacks(model, as_base, tokenizer, concept, prompts, settings, guidance_scale=guidance_scale,
                               temperature=temperature, batch_size=batch_size, anchors=list(anchors or ()),
                               progress=progress)
    found = distributed.broadcast_from_main(found, "handing the attacks' prompts to every rank")
    images = {}
    every = [prompt for attack in found.values() for prompt in attack["prompts"]]
    for side in side_names:
        with as_base() if side == "before" else contextlib.nullcontext():
            drawn = sample_prompt_images(model, tokenizer, every, seeds, guidance_scale=guidance_scale,
                                         temperature=temperature, batch_size=batch_size, progress=progress,
                                         desc=f"attacks: sampling ({side})")
        if drawn is None:
            continue
        images[side], start = {}, 0
        for name, attack in found.items():
            images[side][name] = drawn[start:start + len(attack["prompts"])]
            start += len(attack["prompts"])
    if not ranks.main:
        return None, None
    judged = judge_attacks(images, found, judge, concept)
    result = {
        "format": ATTACK_FORMAT, "concept": concept, "model": str(model_source),
        "checkpoint": str(resolved) if resolved is not None else None, "seeds": list(seeds),
        "judge": judge.describe(), "settings": {**settings.describe(), "guidance_scale": guidance_scale,
                                                "temperature": temperature, "batch_size": batch_size},
        "attacks": {name: {"prompts": attack["prompts"], "sides": judged[name],
                           "search": {key: value for key, value in attack["search"].items() if key != "seconds"}}
                    for name, attack in found.items()},
    }
    result["strongest"] = strongest_attack(result)
    timing = {name: round(attack["search"].get("seconds", 0.0), 3) for name, attack in found.items()}
    result["_search_seconds"] = timing  # taken out by the writer into timing.json
    return result, images


def strongest_attack(result: dict) -> str | None:
    """The attack (not plain) with the highest success rate on the last side (after, or the one model)."""
    rates = {name: list(block["sides"].values())[-1]["success_rate"] for name, block in result["attacks"].items()
             if name != "plain"}
    rates = {name: rate for name, rate in rates.items() if rate == rate}
    return max(rates, key=lambda name: (rates[name], -ATTACKS.index(name))) if rates else None


# ---------------------------------------------------------------- the report


def attacks_table(result: dict) -> str:
    """Markdown: each attack's success rate per side, and what its search cost."""
    sides = list(next(iter(result["attacks"].values()))["sides"])
    header = "| attack | prompts | " + " | ".join(f"success {side}" for side in sides) + " | search |"
    lines = [header, "| --- | ---: | " + " | ".join("---:" for _ in sides) + " | --- |"]
    for name, block in result["attacks"].items():
        search = block["search"]
        cost = "-" if name in ("plain", "paraphrase") else f"{search.get('steps')} steps ({search.get('stopped')})"
        if name == "paraphrase":
            cost = search.get("source", "-")
        rates = " | ".join("-" if block["sides"][side]["success_rate"] != block["sides"][side]["success_rate"]
                           else f"{100 * block['sides'][side]['success_rate']:.1f}%" for side in sides)
        mark = " (strongest)" if name == result.get("strongest") else ""
        lines.append(f"| {name}{mark} | {len(block['prompts'])} | {rates} | {cost} |")
    return "\n".join(lines)


def attack_summary(result: dict, timing: dict | None = None) -> str:
    """summary.md of an attack report (and the section eval adds to its own)."""
    lines = [f"# Attacks on the erasure of {result['concept']!r}", "",
             f"Model `{result['model']}`" + (f", checkpoint `{result['checkpoint']}`" if result["checkpoint"] else "")
             + f"; {len(result['seeds'])} held-out seed(s) a prompt; judge {result['judge'].get('name')}.", "",
             "Success rate: the share of the attacked prompts' images in which the judge sees the concept.", "",
             attacks_table(result), ""]
    if timing:
        lines += ["Search time (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timing.items()), ""]
    for name, block in result["attacks"].items():
        lines.append(f"## {name}: example prompts")
        lines += [f"- `{prompt}`" for prompt in block["prompts"][:5]]
        lines.append("")
    return "\n".join(lines)


def best_grid(images_by_side: dict, block: dict):
    """One image: a row per side of the attack's images the judge sees the concept in most surely."""
    from earkit.engine.sampler import image_grid

    rows = []
    for side, judged in block["sides"].items():
        row = [images_by_side[side][p][s] for p, s, _ in judged["best"]]
        if row:
            rows.append(row)
    return image_grid(rows) if rows else None


def write_attack_files(folder, result: dict, images: dict) -> list[str]:
    """attacks.json, attacks.md and images/attack-NAME.png (each attack's best images, a row a
    side) into `folder`; the names written, relative to it. result's _search_seconds go to
    attacks-timing.json."""
    import json
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    record = {key: value for key, value in result.items() if key != "_search_seconds"}
    timing = result.get("_search_seconds", {})
    written = ["attacks.json", "attacks-timing.json", "attacks.md"]
    (folder / "attacks.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "attacks-timing.json").write_text(json.dumps({"search_seconds": timing}, indent=1) + "\n")
    (folder / "attacks.md").write_text(attack_summary(record, timing) + "\n", encoding="utf-8")
    for name, block in record["attacks"].items():
        grid = best_grid({side: by_attack[name] for side, by_attack in images.items()}, block)
        if grid is not None:
            grid.save(folder / "images" / f"attack-{name}.png")
            written.append(f"images/attack-{name}.png")
    return written
