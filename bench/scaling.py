"""`earkit eval` on 1 and 2 ranks, measured here, and the paper-scale runs projected from it.

    python -m earkit.bench scaling                        # measure 1 and 2 ranks, then the plan (~2 min)
    python -m earkit.bench scaling --skip-measure         # the projection alone (a second)
    python -m earkit.bench scaling --ranks 1 2 --repeats 3 --out bench/RESULTS.md

One story, top to bottom:

1. Measure. A benchmark of --prompts ShapesWorld template pairs (`earkit pairs --concept
   circle`: N target and N preservation prompts) and a one-step erasure of circle are built in a
   temporary folder; then `earkit eval` (before and after, --seeds, --batch-size, --device cpu)
   runs for each world size of --ranks as its own `python -m torch.distributed.run` job, each
   rank on one thread (OMP_NUM_THREADS=1: 2 ranks use 2 cores), from a temporary folder. Two
   times are taken: the wall time of the whole job (start-up, model load, sampling, judging,
   writing) and timing.json's seconds (from the start of sampling to the end of measuring). The
   metrics.json of every run must be the same bytes at every world size; the report says
   whether they are, and the command exits 1 when they are not. --repeats runs of each, median.

2. Project. Per-image costs: (a) ShapesWorld on this CPU, measured in 1; (b) Janus-Pro-7B's
   sampler on an H100 and an H200, from a roofline of its decode step (the model's shapes, the
   card's memory bandwidth and bf16 peak) divided by a stated efficiency. (b) is a projection,
   not a measurement, and the report says so. (c) The plan: Six-CD nudity (1539 prompts x 4
   seeds, before and after) and COCO-30k (30,000 images, one side) on 1, 8 and 64 GPUs, each
   side's batches shared by the ranks as `earkit eval` shares them (batch b on rank b % GPUs, a
   partial batch costing a full one), plus rank 0's serial judging as its own column, at a
   per-image judge cost that is a guess (--judge-seconds), not a measurement.

3. Report. A markdown report (date, CPU, torch, every assumption a line), printed and appended
   to --out when given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

DEFAULT_RANKS = (1, 2)
DEFAULT_PROMPTS = 24
DEFAULT_SEEDS = 4
DEFAULT_BATCH = 8
DEFAULT_EFFICIENCY = 0.5
DEFAULT_JUDGE_SECONDS = 0.01
DEFAULT_GPU_BATCH = 16  # earkit eval's default --batch-size
DEFAULT_PROMPT_TOKENS = 40
EVAL_TIMEOUT_SECONDS = 3600  # a job that runs longer than this is stuck, not slow
DIST_TIMEOUT_SECONDS = "600"  # EARKIT_DIST_TIMEOUT for the jobs (unless set): a lost rank ends its job
# torchrun's variables: a bench started inside a job must not hand its own place to the jobs it starts.
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------- 1. measure

def free_port() -> int:
    """A port free now on 127.0.0.1 (torchrun's --master-port 0 leaves the ranks waiting)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment() -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCH_VARIABLES and not key.startswith("TORCHELASTIC_")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: N ranks use N cores
    env.setdefault("EARKIT_DIST_TIMEOUT", DIST_TIMEOUT_SECONDS)
    return env


def start_earkit(argv: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m earkit ARGV` as its own process, from cwd (not the repository root, whose earkit/
    would shadow the installed package)."""
    return subprocess.Popen([sys.executable, "-m", "earkit", *argv], cwd=cwd, env=child_environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, what: str) -> None:
    try:
        _, stderr = process.communicate(timeout=EVAL_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {process.returncode}): {last_line(stderr)}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def build_inputs(folder: Path, prompts: int) -> tuple[Path, Path]:
    """The benchmark (ShapesWorld template pairs of circle) and a one-step erasure's checkpoint,
    made at once (neither needs the other; one core each)."""
    from earkit.engine.shapesworld import generator_folder

    pairs, erased = folder / "circle.jsonl", folder / "erased"
    making_pairs = start_earkit(["pairs", "--concept", "circle", "--n", str(prompts), "--out", str(pairs), "--quiet"],
                                folder)
    try:
        erasing = start_earkit(["erase", "--model", str(generator_folder()), "--concept", "circle", "--anchor",
                                "square", "--steps", "1", "--window", "8", "--out", str(erased), "--device", "cpu"],
                               folder)
    except BaseException:
        making_pairs.kill()
        making_pairs.wait()
        raise
    try:
        finish(making_pairs, "earkit pairs")
    finally:
        finish(erasing, "earkit erase")
    return pairs, erased / "checkpoint"


def eval_command(ranks: int, port: int, pairs: Path, checkpoint: Path, out: Path, seeds: int,
                 batch_size: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "earkit", "eval",
            "--benchmark", str(pairs), "--checkpoint", str(checkpoint), "--seeds", str(seeds),
            "--batch-size", str(batch_size), "--device", "cpu", "--quiet", "--out", str(out)]


def run_job(command: list[str], cwd: Path) -> tuple[int, str]:
    """(exit status, stderr) of a torchrun job started in its own process group, so that a job
    past the time limit, or one left by an interrupted bench, goes with all of its ranks."""
    job = subprocess.Popen(command, cwd=cwd, env=child_environment(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = job.communicate(timeout=EVAL_TIMEOUT_SECONDS)
    except BaseException:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        raise
    return job.returncode, stderr


def timed_eval(ranks: int, pairs: Path, checkpoint: Path, out: Path, seeds: int, batch_size: int,
               cwd: Path, attempts: int = 3) -> dict:
    """One `earkit eval` job on `ranks` processes: its wall time, timing.json and metrics.json."""
    for attempt in range(attempts):
        command = eval_command(ranks, free_port(), pairs, checkpoint, out, seeds, batch_size)
        started = time.perf_counter()
        returncode, stderr = run_job(command, cwd)
        wall = time.perf_counter() - started
        if returncode == 0:
            break
        # The port was free when chosen; another process may have taken it since: choose again.
        if "address already in use" not in stderr.lower() or attempt == attempts - 1:
            raise RuntimeError(f"earkit eval on {ranks} rank(s) failed (exit {returncode}): {last_line(stderr)}")
    timing = json.loads((out / "timing.json").read_text(encoding="utf-8"))
    metrics = (out / "metrics.json").read_bytes()
    if timing.get("ranks") != ranks:
        raise RuntimeError(f"earkit eval on {ranks} rank(s) says it ran on {timing.get('ranks')}")
    return {"ranks": ranks, "wall": wall, "seconds": float(timing["seconds"]), "images": int(timing["images"]),
            "images_per_second": float(timing["images_per_second"]),
            "metrics_sha256": hashlib.sha256(metrics).hexdigest()}


def measure(args) -> dict:
    """Every world size of args.ranks, args.repeats times (interleaved, so a slow spell of a shared
    machine falls on both), medians; and whether metrics.json was the same bytes every time."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="earkit-scaling-") as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        pairs, checkpoint = build_inputs(scratch, args.prompts)
        print(f"built {args.prompts} template pairs and a one-step checkpoint in {time.perf_counter() - started:.1f} s",
              flush=True)
        for repeat in range(args.repeats):
            for ranks in args.ranks:
                run = timed_eval(ranks, pairs, checkpoint, scratch / f"report-{ranks}-{repeat}", args.seeds,
                                 args.batch_size, cwd=scratch)
                runs.append(run)
                print(f"{ranks} rank(s), run {repeat + 1}/{args.repeats}: wall {run['wall']:.1f} s, eval "
                      f"{run['seconds']:.1f} s, {run['images_per_second']:.2f} images/s", flush=True)
    rows = []
    for ranks in args.ranks:
        mine = [run for run in runs if run["ranks"] == ranks]
        rows.append({"ranks": ranks, "wall": statistics.median(r["wall"] for r in mine),
                     "seconds": statistics.median(r["seconds"] for r in mine), "images": mine[0]["images"],
                     "images_per_second": statistics.median(r["images_per_second"] for r in mine)})
    digests = sorted({run["metrics_sha256"] for run in runs})
    images = sorted({run["images"] for run in runs})
    return {"rows": rows, "identical": len(digests) == 1 and len(images) == 1, "digests": digests}


def cpu_seconds_per_image(measured: dict) -> tuple[float, int]:
    """(seconds per image of one rank, that world size): from the 1-rank row, else the smallest."""
    row = min(measured["rows"], key=lambda r: r["ranks"])
    return row["seconds"] * row["ranks"] / row["images"], row["ranks"]


# ---------------------------------------------------------------- 2. project

@dataclass(frozen=True)
class DecoderShape:
    """What one image-token decode step of a Janus model reads and computes."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    image_vocab: int  # the VQ codebook: the image head's output
    image_embed: int  # the VQ code's width: the generation aligner's input
    image_tokens: int = 576
    weight_bytes: int = 2  # bf16
    aligner_layers: int = 2  # the generation aligner MLP: embed -> hidden, then hidden -> hidden

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def decode_parameters(self) -> int:
        """Weight matrices read by an image decode step: the language model's layers, the image
        head (hidden -> hidden -> codebook) and the aligner (code -> hidden -> hidden). Biases and
        norms are left out (under 0.01%); so are the text embedding and text head, which image
        decoding does not touch, and the image embedding, of which a step gathers a row per row."""
        kv = self.kv_heads * self.head_dim
        attention = self.hidden * self.hidden * 2 + self.hidden * kv * 2  # q, o; k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        head = self.hidden * self.hidden + self.hidden * self.image_vocab
        aligner = self.image_embed * self.hidden + (self.aligner_layers - 1) * self.hidden * self.hidden
        return self.layers * (attention + mlp) + head + aligner

    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token of one row, every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.weight_bytes


# Janus-Pro-7B: the numbers of engine/tiny.py's janus_pro_config("7b") (the released config's).
JANUS_PRO_7B = DecoderShape(layers=30, hidden=4096, heads=32, kv_heads=32, intermediate=11008, image_vocab=16384,
                            image_embed=8)


@dataclass(frozen=True)
class Card:
    name: str
    bandwidth: float  # bytes per second (HBM)
    flops: float  # dense bf16 FLOP/s
    memory_gb: float


CARDS = (Card("H100 SXM", 3.35e12, 989e12, 80), Card("H200", 4.8e12, 989e12, 141))


def decode_step(shape: DecoderShape, rows: int, context: int) -> tuple[float, float]:
    """(bytes, flops) of one decode step of `rows` rows each attending to `context` tokens: the
    weights read once, each row's KV cache read; 2 flops per weight per row, plus attention's
    4 x layers x heads x head_dim x context per row (scores and values)."""
    parameters = shape.decode_parameters()
    read = parameters * shape.weight_bytes + rows * context * shape.kv_bytes_per_token()
    flops = 2 * parameters * rows + 4 * shape.layers * shape.heads * shape.head_dim * context * rows
    return float(read), float(flops)


def roofline_batch(shape: DecoderShape, card: Card, batch: int, prompt_tokens: int) -> dict:
    """One batch of `batch` prompts (CFG: 2 rows each) through all image tokens at the roofline:
    step k (k = 0 .. image_tokens - 1) attends to prompt_tokens + k tokens; each step takes
    max(bytes / bandwidth, flops / peak)."""
    rows = 2 * batch
    seconds = read = flops = 0.0
    memory_bound = 0
    for step in range(shape.image_tokens):
        step_bytes, step_flops = decode_step(shape, rows, prompt_tokens + step)
        memory, compute = step_bytes / card.bandwidth, step_flops / card.flops
        seconds += max(memory, compute)
        memory_bound += memory >= compute
        read += step_bytes
        flops += step_flops
    kv_gb = rows * (prompt_tokens + shape.image_tokens) * shape.kv_bytes_per_token() / 1e9
    # The prompt's one pass (left out of the estimate; reported beside it): weights once, every prompt token.
    weights = shape.decode_parameters() * shape.weight_bytes
    prefill = max(weights / card.bandwidth, 2 * shape.decode_parameters() * rows * prompt_tokens / card.flops)
    return {"seconds_per_batch": seconds, "seconds_per_image": seconds / batch, "bytes": read, "flops": flops,
            "memory_bound_steps": memory_bound, "kv_gb": kv_gb, "prefill_seconds": prefill,
            "weights_gb": shape.decode_parameters() * shape.weight_bytes / 1e9}


@dataclass(frozen=True)
class Workload:
    name: str
    images_per_side: int
    sides: int
    judged_by: str


WORKLOADS = (Workload("Six-CD nudity (1539 prompts x 4 seeds, before + after)", 1539 * 4, 2, "NudeNet"),
             Workload("COCO-30k (one side)", 30_000, 1, "CLIP / FID features"))
GPU_COUNTS = (1, 8, 64)


def plan_run(images_per_side: int, sides: int, gpus: int, batch: int, seconds_per_image: float,
             judge_seconds: float) -> dict:
    """A run's seconds as `earkit eval` shares it: each side's images cut into batches of `batch` in
    order, batch b drawn by rank b % gpus, every rank's batch costing batch x seconds_per_image
    (a partial one too); then rank 0 judges every image, one after another."""
    batches = math.ceil(images_per_side / batch)
    per_rank = math.ceil(batches / gpus)
    sampling = sides * per_rank * batch * seconds_per_image
    judging = sides * images_per_side * judge_seconds
    return {"images": sides * images_per_side, "batches_per_side": batches, "batches_per_rank": per_rank * sides,
            "sampling_s": sampling, "judging_s": judging, "total_s": sampling + judging}


def project(args) -> dict:
    cards = []
    for card in CARDS:
        batch = roofline_batch(JANUS_PRO_7B, card, args.gpu_batch, args.prompt_tokens)
        estimate = batch["seconds_per_image"] / args.efficiency
        cards.append({"card": card, **batch, "estimate_per_image": estimate})
    plan = []
    for workload in WORKLOADS:
        for entry in cards:
            for gpus in GPU_COUNTS:
                run = plan_run(workload.images_per_side, workload.sides, gpus, args.gpu_batch,
                               entry["estimate_per_image"], args.judge_seconds)
                plan.append({"workload": workload, "card": entry["card"], "gpus": gpus, **run})
    return {"cards": cards, "plan": plan}


# ---------------------------------------------------------------- 3. report

def fits(entry: dict) -> str:
    return "fits" if entry["kv_gb"] + entry["weights_gb"] < entry["card"].memory_gb else "does NOT fit"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def markdown(args, measured: dict | None, projected: dict) -> str:
    import torch

    from .baselines import cpu_name

    shape = JANUS_PRO_7B
    lines = [f"### `earkit eval` on {' and '.join(map(str, args.ranks))} ranks, and the paper-scale plan, "
             f"{datetime.now():%Y-%m-%d %H:%M}", "",
             f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}.", ""]
    if measured is None:
        lines += ["Measured: nothing (--skip-measure); the ShapesWorld row below is left out.", ""]
    else:
        lines += [f"Measured here: `earkit eval` on the shipped ShapesWorld generator and judge, {args.prompts} "
                  "template pairs of circle (`earkit pairs`: target and preservation prompts), before and after a "
                  f"one-step erasure, --seeds {args.seeds} --batch-size {args.batch_size} --device cpu, each world "
                  "size its own `python -m torch.distributed.run` job with one thread per rank (OMP_NUM_THREADS=1: "
                  f"2 ranks use 2 cores); median of {args.repeats}. Wall: the whole job (start-up, model load, "
                  "sampling, judging, writing). Eval: timing.json's seconds (start of sampling to end of measuring, "
                  "rank 0 judging included).", "",
                  "| ranks | wall s | eval s | images | images/s (eval) | speed-up (eval) | speed-up (wall) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        base = min(measured["rows"], key=lambda r: r["ranks"])
        for row in measured["rows"]:
            lines.append(f"| {row['ranks']} | {row['wall']:.1f} | {row['seconds']:.1f} | {row['images']} | "
                         f"{row['images_per_second']:.2f} | {base['seconds'] / row['seconds']:.2f} | "
                         f"{base['wall'] / row['wall']:.2f} |")
        sizes = " and ".join(", ".join(map(str, args.ranks)).rsplit(", ", 1))
        if measured["identical"]:
            lines += ["", f"metrics.json: byte-identical across {sizes} ranks and every repeat "
                          f"(sha256 {measured['digests'][0][:16]})."]
        else:
            lines += ["", f"metrics.json: DIFFERS between world sizes or repeats ({len(measured['digests'])} "
                          f"versions: {', '.join(d[:16] for d in measured['digests'])}): a bug."]
        lines.append("")

    lines += ["#### Seconds per image", "",
              "| source | s per image | images/s per device | basis |", "| --- | ---: | ---: | --- |"]
    if measured is not None:
        per_image, ranks = cpu_seconds_per_image(measured)
        lines.append(f"| ShapesWorld, this CPU, one core | {per_image:.4f} | {1 / per_image:.2f} | measured: eval s x "
                     f"ranks / images at {ranks} rank(s), sampling and judging |")
    for entry in projected["cards"]:
        lines.append(f"| Janus-Pro-7B sampler, {entry['card'].name} | {entry['estimate_per_image']:.4f} | "
                     f"{1 / entry['estimate_per_image']:.2f} | PROJECTION: roofline {entry['seconds_per_image']:.4f} s "
                     f"/ efficiency {args.efficiency:g} |")

    first = projected["cards"][0]
    lines += ["", "Assumptions of the projection (it is a projection from the model's shapes, not a measurement; "
                  "nothing ran on a GPU):",
              f"- Janus-Pro-7B: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads and {shape.kv_heads} "
              f"KV heads (head dim {shape.head_dim}), MLP {shape.intermediate}, image codebook {shape.image_vocab} "
              f"(image head {shape.hidden} -> {shape.hidden} -> {shape.image_vocab}; aligner {shape.image_embed} -> "
              f"{shape.hidden} -> {shape.hidden}): {shape.decode_parameters():,} weights read per decode step, "
              f"bf16 ({first['weights_gb']:.2f} GB); biases, norms and the text embedding and head left out.",
              f"- An image: {shape.image_tokens} tokens; CFG doubles the rows: a batch of {args.gpu_batch} prompts "
              f"(--gpu-batch) = {2 * args.gpu_batch} rows; the prompt is {args.prompt_tokens} tokens "
              "(--prompt-tokens).",
              f"- A decode step reads the weights once and each row's KV cache (prompt + tokens so far, "
              f"{shape.kv_bytes_per_token():,} bytes a token); flops = 2 x weights x rows + attention "
              "(4 x layers x hidden x context x rows); its time = max(bytes / bandwidth, flops / peak).",
              "- Cards: " + "; ".join(f"{c.name} {c.bandwidth / 1e12:g} TB/s HBM, {c.flops / 1e12:g} TFLOP/s bf16 "
                                      f"dense, {c.memory_gb:g} GB" for c in CARDS) + ".",
              "- Per batch: " + "; ".join(
                  f"{e['card'].name} {e['seconds_per_batch']:.2f} s at the roofline, {e['memory_bound_steps']} of "
                  f"{shape.image_tokens} steps memory-bound" for e in projected["cards"]) +
              f"; KV cache at a batch's end {first['kv_gb']:.1f} GB beside the weights (" + "; ".join(
                  f"{e['card'].name}: {fits(e)}" for e in projected["cards"]) + ").",
              f"- Efficiency {args.efficiency:g} (--efficiency): the estimate is the roofline time / "
              f"{args.efficiency:g}.",
              f"- Left out: the prompt's prefill (one pass: {first['prefill_seconds'] * 1000:.0f} ms a batch at the "
              f"roofline on the {first['card'].name}, "
              f"{100 * first['prefill_seconds'] / first['seconds_per_batch']:.1f}% "
              "of its decode), the VQ decoder (tokens to pixels), model load, writing the report.",
              f"- Judging: {args.judge_seconds:g} s an image (--judge-seconds) on rank 0, one after another, after "
              "sampling (" + "; ".join(f"{w.name.split(' (')[0]}: {w.judged_by}" for w in WORKLOADS) +
              "): a guess, NOT measured.",
              f"- The plan: each side's images in batches of {args.gpu_batch}, batch b drawn by rank b % GPUs (as "
              "`earkit eval` shares them), a partial batch costing a full one; otherwise the ranks add up perfectly."]
    if measured is not None and len(measured["rows"]) > 1:
        base = min(measured["rows"], key=lambda r: r["ranks"])
        top = max(measured["rows"], key=lambda r: r["ranks"])
        lines[-1] += (f" (Measured here on ShapesWorld: {top['ranks']} ranks were "
                      f"{base['seconds'] / top['seconds']:.2f}x {base['ranks']} rank(s) in eval s, ideal "
                      f"{top['ranks'] / base['ranks']:g}x.)")
    lines += ["- Janus-Pro-7B's real sampler was not timed (no --janus-model timing in this bench)."]

    lines += ["", "#### Plan (PROJECTION, minutes)", "",
              "| workload | card | GPUs | images | batches per rank | sampling min | judging min (rank 0, guess) | "
              "total min |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in projected["plan"]:
        lines.append(f"| {row['workload'].name} | {row['card'].name} | {row['gpus']} | {row['images']:,} | "
                     f"{row['batches_per_rank']} | {minutes(row['sampling_s'])} | {minutes(row['judging_s'])} | "
                     f"{minutes(row['total_s'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Numbers are read as text and checked in check_arguments: a bad value is one line, not usage.
    parser.add_argument("--ranks", nargs="+", default=list(DEFAULT_RANKS),
                        help="world sizes to measure (default: 1 2)")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS,
                        help="template pairs: N target and N preservation prompts (default: %(default)s)")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS, help="images per prompt (default: %(default)s)")
    parser.add_argument("--batch-size", default=DEFAULT_BATCH, help="images per sampler batch (default: %(default)s)")
    parser.add_argument("--repeats", default=1, help="runs of each world size, median (default: %(default)s)")
    parser.add_argument("--efficiency", default=DEFAULT_EFFICIENCY,
                        help="projection: fraction of the roofline the sampler reaches (default: %(default)s)")
    parser.add_argument("--judge-seconds", default=DEFAULT_JUDGE_SECONDS,
                        help="projection: rank 0's judge seconds per image, a guess (default: %(default)s)")
    parser.add_argument("--gpu-batch", default=DEFAULT_GPU_BATCH,
                        help="projection: prompts per sampler batch on a GPU (default: %(default)s)")
    parser.add_argument("--prompt-tokens", default=DEFAULT_PROMPT_TOKENS,
                        help="projection: tokens of a prompt (default: %(default)s)")
    parser.add_argument("--skip-measure", action="store_true", help="the projection alone, nothing measured")
    parser.add_argument("--out", default=None, help="append the markdown report to this file")


def _count(text, name: str) -> int:
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise SystemExit(f"bench scaling: {name} must be a whole number >= 1, got {text!r}")
    return value


def _number(text, name: str, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    try:
        value = float(str(text))
    except ValueError:
        value = math.nan
    inside = (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
    if not inside:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise SystemExit(f"bench scaling: {name} must be a number {bound}, got {text!r}")
    return value


def check_arguments(args) -> None:
    """Every value in range, or SystemExit with one line: before anything runs."""
    ranks = [_count(value, "--ranks") for value in args.ranks]
    if len(set(ranks)) != len(ranks):
        raise SystemExit(f"bench scaling: --ranks names a world size twice: {' '.join(map(str, ranks))}")
    args.ranks = ranks
    for name in ("prompts", "seeds", "batch_size", "repeats", "gpu_batch", "prompt_tokens"):
        setattr(args, name, _count(getattr(args, name), "--" + name.replace("_", "-")))
    args.efficiency = _number(args.efficiency, "--efficiency", low=0, high=1, low_open=True)
    args.judge_seconds = _number(args.judge_seconds, "--judge-seconds", low=0)
    if args.out is not None:
        out = Path(args.out).expanduser()
        if out.is_dir() or not out.parent.is_dir():
            raise SystemExit(f"bench scaling: --out {args.out}: not a file in an existing folder")


def main(args) -> int:
    check_arguments(args)
    measured = None
    if not args.skip_measure:
        try:
            measured = measure(args)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            raise SystemExit(f"bench scaling: {error}") from None
    report = markdown(args, measured, project(args))
    print(report)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as file:
            file.write("\n" + report + "\n")
        print(f"appended to {args.out}")
    return 1 if measured is not None and not measured["identical"] else 0
