"""Engine benchmark: the sampler and one erasure step at the Janus-Pro shapes, random weights.

    python -m earkit.bench engine --size 7b --random-weights      # a GPU
    python -m earkit.bench engine --size tiny --random-weights    # any CPU (a smoke run)

What it reports, for the model built from the real Janus-Pro config with random weights (no
download; the timings do not depend on the weight values):
  - sampler ms per decode step (576 image tokens, CFG: 2 rows per prompt) at batch 1 and 16;
  - one erasure step's ms per prompt pair, split into teacher sampling (step 1) and the
    teacher-forced update (steps 2-6, token-kl, W = 48, parallel WGA, AdamW8bit when
    bitsandbytes imports), at --train-batch pairs;
  - peak GPU memory of each (torch.cuda.max_memory_allocated);
  - the projected time for a 50-pair concept: 50 x (sampling + update per pair).
The released EAR loop needs about 116 minutes and 17 GB for this at the 7B size on an H200
(DESIGN.md, anchors).
"""

from __future__ import annotations

import datetime
import importlib.util
import statistics
import time

import torch

PAIRS_PER_CONCEPT = 50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 1) -> tuple[float, object]:
    """Median seconds of fn() over repeats, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def build_random_model(size: str, device: torch.device, dtype: torch.dtype):
    """Janus-Pro's architecture at `size` (1b, 7b) or a tiny one, random weights, built on the device."""
    from transformers import JanusForConditionalGeneration

    from earkit.engine.model import attention_implementation
    from earkit.engine.tiny import janus_pro_config, tiny_janus_config, word_tokenizer

    tokenizer = word_tokenizer(["church", "cinema", "photo", "hill", "sea"])
    config = tiny_janus_config(len(tokenizer)) if size == "tiny" else janus_pro_config(size)
    config._attn_implementation = attention_implementation(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    return model, tokenizer


def run(size: str = "7b", device: str | None = None, dtype: str = "auto", sampler_batches=(1, 16),
        train_batch: int = 8, window: int = 48, optimizer: str = "adamw8bit", gradient_checkpointing: bool = True,
        repeats: int = 1, on_figure=None) -> dict:
    """The report (a dict of figures). on_figure(name, value) is called as each figure is measured
    (bench/gpu_check.py logs them at once, so a run stopped by its time limit keeps the finished ones)."""
    from earkit.engine.model import default_device, resolve_dtype
    from earkit.engine.pair_files import PromptPair
    from earkit.engine.sampler import sample_image_tokens
    from earkit.engine.trainer import (
        EraseConfig, FrozenTeacher, enable_gradient_checkpointing, make_optimizer, select_trainable, student_update,
        teacher_targets,
    )

    device = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        optimizer = "adamw"  # the GPU machines may lack it; the report says which optimizer ran

    def put(name, value):
        report[name] = value
        if on_figure is not None:
            on_figure(name, value)

    started = time.perf_counter()
    model, tokenizer = build_random_model(size, device, torch_dtype)
    _sync(device)
    build_seconds = time.perf_counter() - started
    n_tokens = model.config.vision_config.num_image_tokens
    report = {"size": size, "device": str(device), "dtype": str(torch_dtype).replace("torch.", ""),
              "image_tokens": n_tokens, "optimizer": optimizer, "window": window, "train_batch": train_batch,
              "gradient_checkpointing": gradient_checkpointing}
    if device.type == "cuda":
        report["card"] = torch.cuda.get_device_name(device)
    put("build_s", build_seconds)

    prompt = "a photo of a church on a hill by the sea"
    sample_image_tokens(model, tokenizer, [prompt], guidance_scale=5.0, seed=0, progress=False)  # warm-up
    for batch in sampler_batches:
        _reset_peak(device)
        seconds, _ = _timed(lambda: sample_image_tokens(model, tokenizer, [prompt] * batch, guidance_scale=5.0,
                                                        seed=1, progress=False), device, repeats)
        put(f"sampler_ms_per_step_b{batch}", 1000 * seconds / n_tokens)
        put(f"sampler_s_per_batch_b{batch}", seconds)
        put(f"sampler_peak_gb_b{batch}", _peak_gb(device))

    config = EraseConfig(model="(random weights)", concept="church", anchor="cinema", window=window,
                         optimizer=optimizer, batch_size=train_batch, gradient_checkpointing=gradient_checkpointing)
    trainable = select_trainable(model, config.trainable)
    teacher = FrozenTeacher(trainable)
    optim = make_optimizer(optimizer, trainable.values(), config.lr, config.weight_decay)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pairs = [PromptPair(f"a photo of a church number {i}", f"a photo of a cinema number {i}") for i in range(train_batch)]
    parameters = list(trainable.values())
    teacher_targets(model, tokenizer, teacher, pairs[:1], 0, config)  # warm-up (kernels, allocator)
    _reset_peak(device)
    sample_seconds, targets = _timed(lambda: teacher_targets(model, tokenizer, teacher, pairs, 1, config), device)
    update_seconds, stats = _timed(lambda: student_update(model, optim, targets, config, parameters), device, repeats)
    put("train_sample_ms_per_pair", 1000 * sample_seconds / train_batch)
    put("train_update_ms_per_pair", 1000 * update_seconds / train_batch)
    put("train_ms_per_pair", report["train_sample_ms_per_pair"] + report["train_update_ms_per_pair"])
    put("train_peak_gb", _peak_gb(device))
    put("train_loss", stats["loss"])
    put("projected_s_per_50_pairs", PAIRS_PER_CONCEPT * report["train_ms_per_pair"] / 1000)
    return report


def format_report(report: dict) -> str:
    lines = [f"### Engine, Janus-Pro-{report['size']} shape, random weights, {datetime.date.today()}", ""]
    lines.append(f"{report.get('card', report['device'])}, {report['dtype']}, torch {torch.__version__}; "
                 f"{report['image_tokens']} image tokens; optimizer {report['optimizer']}, W = {report['window']}, "
                 f"gradient checkpointing {report['gradient_checkpointing']}")
    lines += ["", "| measure | value |", "| --- | ---: |"]
    for key, value in report.items():
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.3f} |")
    return "\n".join(lines)


def main(args) -> None:
    if not args.random_weights:
        raise SystemExit("bench engine: only --random-weights is supported (no model download here)")
    report = run(size=args.size, device=args.device, dtype=args.dtype, sampler_batches=tuple(args.sampler_batches),
                 train_batch=args.train_batch, window=args.window, optimizer=args.optimizer,
                 gradient_checkpointing=not args.no_gradient_checkpointing, repeats=args.repeats)
    text = format_report(report)
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n" + text + "\n")
        print(f"appended to {args.out}")
