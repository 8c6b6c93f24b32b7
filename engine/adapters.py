"""Erasures as LoRA adapters (peft): trained in place of the full weights, saved as a standard
PEFT adapter folder, applied (alone, or several stacked) wherever a checkpoint is.

    earkit erase --adapter lora --lora-rank 4            # OUT/checkpoint is also a PEFT adapter folder
    model = PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained(base), "OUT/checkpoint")
    earkit sample --adapter circle/checkpoint --adapter star/checkpoint --prompt "a red circle" --out s/

Training. `attach_lora` wraps the model with peft (get_peft_model): every Linear module that the
run's `trainable` globs name (a glob matching the module's name or its weight's) gets a LoRA pair
A (rank x in), B (out x rank, zeros), so the model starts as the base model; only A and B train.
The model object stays the JanusForConditionalGeneration the engine knows (peft replaces the
Linear modules inside it), so the trainer, sampler and objectives run unchanged. The frozen
teacher is the same model with its adapter switched off (`AdapterOff`), not a copy of anything.

Files. An adapter run's checkpoint folder holds, beside the resume files (trainable.safetensors:
A and B by their parameter names, optimizer.pt, state.pt, config.json), what PEFT's
save_pretrained writes: adapter_config.json and adapter_model.safetensors (write_adapter_files),
so the checkpoint folder itself is the adapter that PeftModel.from_pretrained loads.

Applying. Sampling, filtering, evaluation and attacks swap tensors into one loaded base model
(apply_trainable, trainer.FrozenTeacher). An adapter reaches them the same way: `merged_weights`
loads it with peft onto the model, reads each adapted layer's delta (peft's get_delta_weight:
scaling * B @ A), takes it off again (the model is as it was), and returns W + delta for each
adapted weight by the parameter's own name. Several adapters are first combined with peft's
add_weighted_adapter(combination_type="cat"), which concatenates the weighted pairs: the stacked
delta is exactly sum_i w_i * delta_i.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ADAPTERS = ("lora",)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name of a model's first adapter


def import_peft():
    """peft, or a RuntimeError that says how to get it. peft imports bitsandbytes, whose CPU
    backend logs that Hugging Face's optional `kernels` package is absent: silenced, as the
    trainer does for the 8-bit optimizer."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import peft
    except ImportError as error:
        raise RuntimeError(f"LoRA adapters need peft ({error}): pip install peft") from None
    return peft


@contextlib.contextmanager
def quiet_peft():
    """Without the FutureWarning peft's wrapping raises on transformers 5.2x (it asks a
    deprecated name, is_gradient_checkpointing): not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ---------------------------------------------------------------- training


def lora_target_modules(model, patterns) -> list[str]:
    """The names of the Linear modules the globs name (the module's name or its weight's)."""
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(
                fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{name}.weight", pattern)
                for pattern in patterns):
            targets.append(name)
    if not targets:
        example = next((name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)), None)
        raise ValueError(f"--adapter lora: the trainable pattern(s) {list(patterns)} name no Linear module of the "
                         f"model (Linear modules are named like {example!r})")
    return targets


def attach_lora(model, patterns, *, rank: int, alpha: float, dropout: float, seed: int, base_model=None):
    """(peft_model, trainable): LoRA pairs on the Linear modules the globs name, A drawn from
    `seed` alone (peft's Kaiming init under a private generator state, so every rank, and every
    run of the same seed, starts from the same A), B zero; `trainable` maps the full parameter
    names of A and B to the parameters, the only ones that require grad."""
    peft = import_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                             target_modules=lora_target_modules(model, patterns), base_model_name_or_path=base_model)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quiet_peft():
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, config)
    if dropout > 0:
        # the engine runs the model in eval mode (no dropout anywhere else); LoRA's dropout is the adapter's own
        for name, module in model.named_modules():
            if ".lora_dropout." in f"{name}.":
                module.train()
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    return peft_model, trainable


class AdapterOff:
    """The frozen teacher of an adapter run: the same model, its adapter switched off (the base
    model exactly, since the base weights never train). The interface of trainer.FrozenTeacher."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def active(self):
        return self.peft_model.disable_adapter()


def write_adapter_files(peft_model, folder: Path, base_model=None) -> None:
    """adapter_config.json and adapter_model.safetensors in `folder`, as PeftModel.save_pretrained
    writes them (the same keys and config), without its model card."""
    import copy

    from safetensors.torch import save_file

    from .checkpoint import cpu_contiguous, source_text

    peft = import_peft()
    state = peft.get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME)
    save_file(cpu_contiguous(state), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[ADAPTER_NAME])
    config.inference_mode = True
    config.base_model_name_or_path = source_text(base_model) if base_model is not None else None
    config.save_pretrained(str(folder))


# ---------------------------------------------------------------- applying


@dataclass(frozen=True)
class AdapterStack:
    """Several adapters applied at once, each times its weight (merged_weights): what
    `--adapter A --adapter B [--adapter-weight ...]` names wherever a checkpoint is taken."""

    folders: tuple[Path, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if not self.folders:
            raise ValueError("an adapter stack needs at least one adapter folder")
        object.__setattr__(self, "folders", tuple(Path(folder).expanduser() for folder in self.folders))
        object.__setattr__(self, "weights", tuple(check_adapter_weights(self.weights, len(self.folders))))

    def __str__(self) -> str:
        return " + ".join(f"{weight:g} x {folder}" for folder, weight in zip(self.folders, self.weights))

    def describe(self) -> dict:
        return {"adapters": [str(folder) for folder in self.folders], "weights": list(self.weights)}


def is_adapter_folder(folder) -> bool:
    return folder is not None and (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: Path) -> dict:
    """The folder's adapter_config.json, checked to be a LoRA adapter earkit can apply: ValueError naming what is not."""
    from earkit.io import parse_json

    path = Path(folder) / ADAPTER_CONFIG
    try:
        record = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"adapter {folder}: {ADAPTER_CONFIG} is unreadable or corrupt ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"adapter {folder}: {ADAPTER_CONFIG} is not a JSON object")
    if record.get("peft_type") != "LORA":
        raise ValueError(f"adapter {folder}: a {record.get('peft_type')!r} adapter; earkit applies LoRA adapters only")
    if record.get("use_dora"):
        raise ValueError(f"adapter {folder}: a DoRA adapter (use_dora); earkit applies plain LoRA adapters only")
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter {folder}: {ADAPTER_WEIGHTS} is missing")
    return record


def check_adapter_weights(weights, count: int) -> list[float]:
    """One finite weight per adapter (None: 1 each)."""
    import math

    if weights is None or len(weights) == 0:
        return [1.0] * count
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(f"{len(weights)} adapter weight(s) for {count} adapter(s): give one weight per adapter")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"adapter weights must be finite numbers, got {weight!r}")
    return [float(weight) for weight in weights]


@torch.no_grad()
def merged_weights(model, folders, weights=None) -> dict[str, Tensor]:
    """W + sum_i weights[i] * delta_i for every weight an adapter in `folders` adapts, by the
    model's own parameter names (what apply_trainable takes), in each weight's dtype, on the CPU;
    the model is left as it was. The adapters are loaded with peft (PeftModel.from_pretrained,
    load_adapter) and, when there are several or a weight is not 1, combined with
    add_weighted_adapter(combination_type="cat"). ValueError naming the adapter that does not fit."""
    peft = import_peft()
    from peft.tuners.lora import LoraLayer

    folders = [Path(folder).expanduser() for folder in folders]
    if not folders:
        raise ValueError("no adapter to apply")
    weights = check_adapter_weights(weights, len(folders))
    for folder in folders:
        read_adapter_config(folder)
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    names = [f"adapter{index}" for index in range(len(folders))]
    peft_model, merged = None, {}
    try:
        for name, folder in zip(names, folders):
            try:
                with quiet_peft():
                    if peft_model is None:
                        peft_model = peft.PeftModel.from_pretrained(model, str(folder), adapter_name=name)
                    else:
                        peft_model.load_adapter(str(folder), adapter_name=name)
            except (ValueError, RuntimeError, KeyError, OSError) as error:
                raise ValueError(f"adapter {folder} does not fit the model ({type(error).__name__}: "
                                 f"{str(error).strip().splitlines()[0][:300]})") from None
        chosen = names[0]
        if len(names) > 1 or weights != [1.0]:
            chosen = "stacked"
            peft_model.add_weighted_adapter(names, weights, chosen, combination_type="cat")
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and chosen in module.lora_A:
                base = module.get_base_layer().weight
                delta = module.get_delta_weight(chosen)
                merged[f"{module_name}.weight"] = (base.detach().float() + delta.float()).to(base.dtype).cpu()
    finally:
        if peft_model is not None:
            peft_model.unload()  # the LoRA layers go, each base Linear returns in its place, unchanged
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    if not merged:
        raise ValueError(f"adapter(s) {', '.join(map(str, folders))} adapt no Linear weight of the model")
    return merged
