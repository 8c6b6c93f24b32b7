"""Images for ECGVF: the model (with an erasure checkpoint applied, or not) and its samples per prompt
and seed, through the engine's own loader and sampler, the same code paths as for Janus-Pro.

    model, tokenizer = load_generator("deepseek-community/Janus-Pro-7B", checkpoint="runs/church/checkpoint")
    images = sample_prompt_images(model, tokenizer, prompts, seeds=[0, 1, 2])   # images[p][s], rank 0
"""

from __future__ import annotations

from pathlib import Path


def resolve_model(model) -> str:
    """The --model value, or the shipped ShapesWorld generator when it is None."""
    if model is not None:
        return str(model)
    from earkit.engine.shapesworld import generator_folder

    return str(generator_folder())


def resolve_checkpoint(checkpoint):
    """An erasure checkpoint folder (or LoRA adapter folder): the folder itself, or a run folder
    holding checkpoint/; an adapters.AdapterStack as it is, its folders checked."""
    from earkit.engine.adapters import AdapterStack, read_adapter_config

    if checkpoint is None:
        return None
    if isinstance(checkpoint, AdapterStack):
        folders = []
        for folder in checkpoint.folders:
            if not folder.is_dir():
                raise FileNotFoundError(f"--adapter {folder} does not exist (a LoRA adapter folder)")
            folder = run_checkpoint(folder)
            read_adapter_config(folder)  # ValueError naming what is not an adapter earkit applies
            folders.append(folder)
        return AdapterStack(tuple(folders), checkpoint.weights)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist (an erasure checkpoint folder, OUT/checkpoint)")
    return run_checkpoint(path)


def run_checkpoint(path: Path) -> Path:
    """A run folder's checkpoint/ (where the folder is not a checkpoint itself), else the folder."""
    if (path / "checkpoint" / "trainable.safetensors").is_file() and not (path / "trainable.safetensors").is_file():
        return path / "checkpoint"
    return path


def load_generator(model, *, checkpoint=None, device: str | None = None, dtype: str = "auto"):
    """load_janus, then the checkpoint's trainable tensors (an adapter's merged weights) copied in
    (apply_trainable, erasure_tensors), as `earkit sample` does."""
    from earkit.engine.checkpoint import apply_trainable, erasure_tensors
    from earkit.engine.model import load_janus

    model, tokenizer = load_janus(resolve_model(model), dtype=dtype, device=device)
    checkpoint = resolve_checkpoint(checkpoint)
    if checkpoint is not None:
        apply_trainable(model, erasure_tensors(model, checkpoint))
    return model, tokenizer


def check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds is empty: at least one seed is needed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seeds must be integers, got {seed!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return seeds


def sample_prompt_images(model, tokenizer, prompts, seeds, *, guidance_scale: float | None = None,
                         temperature: float | None = None, batch_size: int | None = 16, progress: bool = True,
                         desc: str = "images", store=None) -> list[list] | None:
    """images[p][s]: PIL images, one per prompt and seed, each drawn with its own seed (an image
    depends on its prompt and seed, not on the other prompts), through engine.drawing: under
    torchrun every rank draws its share of the batches and rank 0 gets them all (the other ranks
    get None). A store (engine.drawing.ImageStore, check()ed) keeps every image as it is drawn and
    spares a rerun the ones already there. A prompt given twice is drawn once.
    guidance_scale / temperature None: the model's generation_config, else 5 and 1."""
    from earkit.engine.drawing import draw_images, prompt_seed_jobs

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample")
    seeds = check_seeds(seeds)
    distinct = list(dict.fromkeys(prompts))
    jobs = prompt_seed_jobs(distinct, seeds)
    flat = draw_images(model, tokenizer, jobs, guidance_scale=guidance_scale, temperature=temperature,
                       batch_size=batch_size or len(jobs), store=store, progress=progress, desc=desc)
    if flat is None:
        return None
    by_job = {(job.prompt, job.seed): image for job, image in zip(jobs, flat)}
    return [[by_job[prompt, seed] for seed in seeds] for prompt in prompts]
