"""Erasures as LoRA adapters against full self_attn training, and adapters stacked against one run
erasing two concepts: the shipped ShapesWorld.

    python -m earkit.bench adapters                        # ~15 min on 2 cores, one run at a time
    python -m earkit.bench adapters --runs DIR --out bench/RESULTS.md

One story, top to bottom:

1. Train. Each row is `earkit erase` (the ShapesWorld default recipe, 128 steps) as its own
   process, one after another, into DIR/NAME: full self_attn weights (the default), LoRA rank 4
   and rank 16 (--adapter lora, the ShapesWorld LoRA lr 1e-3), star alone at rank 16, and circle
   and star in one rank-16 run. Each process's peak RSS is read from the kernel when it ends
   (os.wait4), its wall time on the clock; the training seconds from its metrics.json. A run
   already complete in DIR is reused (its memory and wall time are then not measured again).
2. Measure. Every shape's rate (the share of images the judge sees drawn as asked), --per-shape
   images each, evaluation seed 2024: the base model, each run (the erase command's own
   evaluation.json, which draws them with the same function and seeds), and the circle and star
   rank-16 adapters stacked at sampling time (peft's add_weighted_adapter, 'cat'), at weights
   (1, 1), (1, 0.75) and (1, 0.5).
3. Size. What an erasure is on disk: adapter_model.safetensors for LoRA, trainable.safetensors
   for full training; and what it holds while it trains: the trainable tensors, their gradients
   and the optimizer state (8-bit AdamW; bitsandbytes keeps tensors under 4096 elements in 32 bits).
4. Report. One markdown table, printed, and appended to --out when given, with the date and CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

SHAPES = ("circle", "square", "triangle", "star", "cross")
RUNS = {  # name -> the `earkit erase` flags of the run
    "full self_attn": [],
    "LoRA r4": ["--adapter", "lora", "--lora-rank", "4"],
    "LoRA r16": ["--adapter", "lora", "--lora-rank", "16"],
    "LoRA r16, star": ["--adapter", "lora", "--lora-rank", "16", "--concept", "star"],
    "LoRA r16, circle+star in one run": ["--adapter", "lora", "--lora-rank", "16", "--concept", "circle",
                                         "--concept", "star"],
}
STACKED = ("LoRA r16", "LoRA r16, star")


def add_arguments(parser) -> None:
    parser.add_argument("--runs", default="adapter-runs", help="folder for the erasure runs (default: %(default)s)")
    parser.add_argument("--per-shape", type=int, default=100, help="images per shape (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default: the recipe's 128; fewer is a smoke run, not a figure)")
    parser.add_argument("--out", default=None, help="append the markdown report to this file")


def folder_name(name: str) -> str:
    """A run's folder: its name as `earkit erase --concepts` names a concept's folder."""
    from earkit.cli.erase import concept_slug

    return concept_slug(name)


def train(folder: Path, flags: list[str], per_shape: int) -> dict:
    """Run `earkit erase FLAGS` as a process of its own, unless complete in `folder`; its peak RSS
    (bytes) and wall seconds when it ran now."""
    record = folder / "bench-process.json"
    if (folder / "evaluation.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    argv = [sys.executable, "-m", "earkit", "erase", "--out", str(folder), "--force", "--eval-images", str(per_shape),
            *flags]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"earkit erase {' '.join(flags)} failed ({process.returncode}):\n{output[-2000:]}")
    measured = {"peak_rss_bytes": usage.ru_maxrss * 1024, "wall_seconds": seconds, "printed": output}
    record.write_text(json.dumps(measured, indent=1) + "\n")
    return measured


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(checkpoint: Path) -> dict:
    """The erasure on disk, and the trainable tensors + their gradients + the optimizer state."""
    from earkit.engine.checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint)
    on_disk = checkpoint / ("adapter_model.safetensors" if (checkpoint / "adapter_config.json").is_file()
                            else "trainable.safetensors")
    trainable = tensor_bytes(saved.tensors.values())
    return {"on_disk": on_disk.stat().st_size, "trainable_parameters": sum(t.numel() for t in saved.tensors.values()),
            "training_state": 2 * trainable + tensor_bytes(tensors_in(saved.optimizer_state.get("state", {})))}


def tensors_in(value) -> list:
    """Every tensor in a nested state (bitsandbytes keeps its 8-bit state in a dict of its own)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def janus_pro_7b_sizes() -> dict:
    """What the same erasures would be at Janus-Pro-7B's shapes (its config on the meta device, no
    weights): the default trainable self_attn weights of layers 0-4 in bf16, and LoRA A and B on the
    same Linear modules in float32 (peft keeps adapters of a bf16 model in float32)."""
    import fnmatch

    import torch
    from transformers import JanusForConditionalGeneration

    from earkit.engine.adapters import lora_target_modules
    from earkit.engine.tiny import janus_pro_config
    from earkit.engine.trainer import DEFAULT_TRAINABLE

    with torch.device("meta"):
        model = JanusForConditionalGeneration(janus_pro_config("7b"))
    full = sum(p.numel() for name, p in model.named_parameters()
               if any(fnmatch.fnmatchcase(name, pattern) for pattern in DEFAULT_TRAINABLE))
    modules = dict(model.named_modules())
    lora = {rank: sum(rank * (modules[name].in_features + modules[name].out_features)
                      for name in lora_target_modules(model, DEFAULT_TRAINABLE)) for rank in (4, 16)}
    return {"full self_attn": 2 * full, "LoRA r4": 4 * lora[4], "LoRA r16": 4 * lora[16]}


def stacked_rates(runs: Path, per_shape: int, weights=(1.0, 1.0)) -> dict:
    """Every shape's rate with the circle and star adapters stacked at `weights`, drawn as the
    erase command's own measurement is: the same function, seeds, and CPU threads (earkit's one
    for the ShapesWorld model, cpu_threads_for), so the figures sit in one table."""
    from earkit.engine.adapters import AdapterStack
    from earkit.engine.checkpoint import apply_trainable, erasure_tensors
    from earkit.engine.model import cpu_threads, cpu_threads_for, load_janus
    from earkit.engine.shapesworld import generator_folder, load_judge
    from earkit.engine.shapesworld.erase import shape_rates

    stack = AdapterStack(tuple(runs / folder_name(name) / "checkpoint" for name in STACKED), weights)
    with cpu_threads(cpu_threads_for(generator_folder(), "cpu")):
        model, tokenizer = load_janus(str(generator_folder()), device="cpu", dtype="fp32")
        apply_trainable(model, erasure_tensors(model, stack))
        return shape_rates(model, tokenizer, load_judge(), n_per_shape=per_shape, seed=2024).shape


def report(args, rows: dict, base: dict, stacked: dict) -> str:
    from earkit.bench.baselines import cpu_name

    def rates(values: dict, erased) -> str:
        return " | ".join(f"**{100 * values[s]:.0f}%**" if s in erased else f"{100 * values[s]:.0f}%" for s in SHAPES)

    lines = [f"## Erasures as LoRA adapters on ShapesWorld ({date.today()}, {cpu_name()}, 1 thread: earkit's choice "
             "for the ShapesWorld model)", "",
             f"Every shape's rate: the share of {args.per_shape} images per shape the judge sees drawn as asked "
             "(evaluation seed 2024); erased shapes in bold. Each run is `earkit erase`, the ShapesWorld recipe (16 "
             "epochs of a concept's 30 pairs: 128 steps; 240 for the run over both concepts' 60), in its own "
             "process, one at a time: peak RSS of that process (training and its before/after measurement, mostly "
             "the runtime's own ~1 GB), its wall time, and the trainer's own seconds. Training state: the trainable "
             "tensors, their gradients and the 8-bit AdamW state (bitsandbytes keeps tensors under 4096 elements, "
             "all of LoRA's here, in 32 bits).", "",
             "| erasure | " + " | ".join(SHAPES) + " | on disk | trainable params | training state | peak RSS | "
             "training s | wall s |",
             "| --- | " + " | ".join("---:" for _ in SHAPES) + " | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| base model | {rates(base, ())} | | | | | | |"]
    for name, row in rows.items():
        sizes, process = row["sizes"], row["process"]
        lines.append(f"| {name} | {rates(row['after'], row['erased'])} | {sizes['on_disk'] / 1024:.0f} KiB | "
                     f"{sizes['trainable_parameters']:,} | {sizes['training_state'] / 1024:.0f} KiB | "
                     f"{process['peak_rss_bytes'] / 2**20:.0f} MiB | {row['training_seconds']:.0f} | "
                     f"{process['wall_seconds']:.0f} |")
    for (first, second), values in stacked.items():
        lines.append(f"| circle and star LoRA r16 adapters, trained apart, stacked (weights {first:g}, {second:g}) | "
                     f"{rates(values, ('circle', 'star'))} | | | | | | |")
    at_7b = janus_pro_7b_sizes()
    lines += ["", "The same erasures on disk at Janus-Pro-7B's shapes (computed from its config, layers 0-4 self_attn): "
              + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in at_7b.items()) + "."]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows, base = {}, None
    for name, flags in RUNS.items():
        folder = runs / folder_name(name)
        print(f"[adapters] {name}: earkit erase {' '.join(flags)}", flush=True)
        process = train(folder, flags + (["--steps", str(args.steps)] if args.steps else []), args.per_shape)
        evaluation = json.loads((folder / "evaluation.json").read_text())
        base = evaluation["before"]
        concept = evaluation["concept"]
        rows[name] = {"after": evaluation["after"], "erased": [concept] if isinstance(concept, str) else concept,
                      "sizes": state_bytes(folder / "checkpoint"), "process": process,
                      "training_seconds": evaluation["erase_seconds"]}
    stacked = {}
    for weights in ((1.0, 1.0), (1.0, 0.75), (1.0, 0.5)):
        print(f"[adapters] the circle and star adapters stacked, weights {weights}", flush=True)
        stacked[weights] = stacked_rates(runs, args.per_shape, weights)
    text = report(args, rows, base, stacked)
    print(text)
    results = {"base": base, "stacked": {f"{a:g},{b:g}": values for (a, b), values in stacked.items()},
               "rows": {name: {k: v for k, v in row.items() if k != "process"} | {
                   "process": {k: v for k, v in row["process"].items() if k != "printed"}} for name, row in rows.items()}}
    (runs / "adapters.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as file:
            file.write("\n" + text)
    return 0
