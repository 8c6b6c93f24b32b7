"""Checkpoints of an erasure run, and exports of the erased model as a full model folder.

A checkpoint is a folder holding only what the run trains and what it needs to resume exactly:

    trainable.safetensors  the trainable tensors by their full parameter names
                           (model.language_model.layers.0.self_attn.q_proj.weight, ...)
    optimizer.pt           optimizer.state_dict(): torch AdamW, bitsandbytes AdamW8bit / PagedAdamW8bit
    state.pt               the trainer's counters, data-order position and RNG states
    config.json            the run's config, the base model it started from, the earkit version

The frozen weights are not in it (they are the base model's), so a checkpoint of Janus-Pro-7B's
first five self_attn blocks is about 0.7 GB where the model is 14.

Writes are atomic. Everything goes into a sibling folder `<name>.partial-<pid>-<ns>` (same parent,
so a rename moves it), every file is fsynced, and only then does that folder take the name.
Replacing a checkpoint (force=True: the trainer's rolling checkpoint) renames the old folder to
`<name>.old-<pid>-<ns>`, the new one into place, and only then deletes the old one. A kill at any
moment therefore leaves a complete checkpoint: at `<name>`, or, in the instant between the two
renames, at `<name>.old-*`, which the next save or load renames back. What a killed save leaves
(`<name>.partial-*`, or a half-deleted `<name>.old-*`) is deleted by the next save of the same
folder. One writer per checkpoint folder at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from earkit import __version__

from earkit.io import (check_replaceable, check_writable, first_line, parse_json, recover_interrupted_save, some_of,
                       write_folder_atomically)

CHECKPOINT_FORMAT = "earkit-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_FILES = (TENSORS_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE)

# Leaves that torch.load(weights_only=True) accepts: state.pt and optimizer.pt are checked against
# these when saved, so a state that could not be loaded fails at the first save, not at resume.
LOADABLE_LEAVES = (str, bytes, int, float, complex, bool, type(None), Tensor, torch.dtype, torch.device, torch.Size)
LOADABLE_CONTAINERS = (dict, list, tuple, set)


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]  # on the CPU, as saved
    optimizer_state: dict  # optimizer.load_state_dict() takes it; tensors on the CPU, it moves them
    state: dict  # the trainer's dict, as given to save_checkpoint
    config: dict  # the trainer's config, as given to save_checkpoint
    base_model: str | None = None
    earkit_version: str | None = None
    folder: Path | None = None


# ---------------------------------------------------------------- atomic folders


def legacy_checkpoint_names(folder: Path) -> set[str] | None:
    """A checkpoint written before manifests existed: its config.json says so, and it holds the four files."""
    try:
        record = parse_json((folder / CONFIG_FILE).read_text(encoding="utf-8"), CONFIG_FILE)
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("format") == CHECKPOINT_FORMAT:
        return set(CHECKPOINT_FILES)
    return None


# ---------------------------------------------------------------- checkpoints


def check_loadable(value, where: str) -> None:
    """Raise ValueError naming the first entry that torch.load(weights_only=True) would refuse."""
    if isinstance(value, LOADABLE_LEAVES):
        return
    if not isinstance(value, LOADABLE_CONTAINERS):
        raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds "
                         "only tensors, numbers, strings, None and lists/tuples/dicts of them, so that it loads with "
                         "torch.load(weights_only=True) (convert it, e.g. a numpy array with torch.from_numpy)")
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict) and not isinstance(key, (str, int)):
            raise ValueError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int keys")
        check_loadable(item, f"{where}[{key!r}]")


def cpu_contiguous(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors as safetensors stores them: detached, on the CPU, contiguous, each with its own storage."""
    if not isinstance(tensors, dict) or not tensors:
        raise ValueError("tensors must be a non-empty dict of parameter name -> tensor")
    ready = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise ValueError(f"tensors[{name!r}]: expected str -> Tensor, got {type(name).__name__} -> "
                             f"{type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (views of one buffer): give those their own.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        ready[name] = tensor
    return ready


def source_text(source) -> str | None:
    """A base model source as config.json records it: an existing local folder as its absolute path."""
    if source is None:
        return None
    text = os.fspath(source)
    path = Path(text).expanduser()
    return str(path.absolute()) if path.exists() else text


def json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-able")


def save_checkpoint(folder: str | os.PathLike, *, tensors: dict[str, Tensor], optimizer_state: dict, state: dict,
                    config: dict, base_model: str | os.PathLike | None = None, force: bool = False,
                    write_more=None) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); returns its absolute path.

    base_model: the model the run started from (a local folder or a hub id), recorded so that
    export_checkpoint can find it; when None, config["base_model"] is used if present.
    write_more(folder): writes more files into the checkpoint, within the same atomic save (an
    adapter run's PEFT files, adapters.write_adapter_files).
    """
    tensors = cpu_contiguous(tensors)
    for name, value in (("optimizer_state", optimizer_state), ("state", state), ("config", config)):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    check_loadable(optimizer_state, "optimizer_state")
    check_loadable(state, "state")
    if base_model is None:
        base_model = config.get("base_model")
    record = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "earkit_version": __version__,
              "base_model": source_text(base_model), "tensors": len(tensors), "config": config}
    try:
        config_text = json.dumps(record, indent=2, default=json_default) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"config is not JSON-able: {error}") from error

    def write_into(partial: Path) -> None:
        save_file(tensors, str(partial / TENSORS_FILE), metadata={"format": "pt"})
        # CUDA (and bitsandbytes paged) tensors are written as CPU tensors by torch.save's copy;
        # load maps them to the CPU and optimizer.load_state_dict moves them to each parameter.
        torch.save(optimizer_state, partial / OPTIMIZER_FILE)
        torch.save(state, partial / STATE_FILE)
        (partial / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        if write_more is not None:
            write_more(partial)

    return write_folder_atomically(folder, write_into, force=force, kind="checkpoint", what="checkpoint",
                                   legacy=legacy_checkpoint_names)


def checked_checkpoint_folder(folder: str | os.PathLike) -> Path:
    """The folder, after recovering an interrupted save; FileNotFoundError naming what is missing."""
    folder = Path(folder).expanduser()
    recover_interrupted_save(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {folder} is incomplete: {', '.join(missing)} missing")
    return folder


def read_checkpoint_record(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        record = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError) as error:  # parse_json: also too deep, or a number too long to read
        raise ValueError(f"checkpoint {folder}: {CONFIG_FILE} is unreadable or corrupt ({error})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT or "config" not in record:
        raise ValueError(f"checkpoint {folder}: {CONFIG_FILE} is not an earkit checkpoint config "
                         f"(no \"format\": \"{CHECKPOINT_FORMAT}\" and \"config\")")
    version = record.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"checkpoint {folder}: {CONFIG_FILE} has format_version {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint {folder} has format version {record['format_version']}; this earkit "
                         f"({__version__}) reads up to {FORMAT_VERSION}")
    return record


def read_checkpoint_tensors(folder: Path) -> dict[str, Tensor]:
    path = folder / TENSORS_FILE
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError)
        raise ValueError(f"checkpoint {folder}: {TENSORS_FILE} is unreadable or corrupt "
                         f"({type(error).__name__}: {first_line(error)})") from None
    if not tensors:
        raise ValueError(f"checkpoint {folder}: {TENSORS_FILE} holds no tensors")
    # A diverged run's NaN weights would sample garbage (or crash the sampler) and export silently.
    broken = [name for name, tensor in tensors.items()
              if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if broken:
        raise ValueError(f"checkpoint {folder}: {TENSORS_FILE} holds NaN or infinite values ({some_of(broken)}); "
                         "the run that wrote it diverged")
    return tensors


def read_torch_file(folder: Path, name: str) -> dict:
    try:
        value = torch.load(folder / name, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises any of several error types
        # torch's own message runs to a dozen lines of advice about weights_only: one line is enough
        raise ValueError(f"checkpoint {folder}: {name} is unreadable or corrupt "
                         f"({type(error).__name__}: {first_line(error)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint {folder}: {name} holds a {type(value).__name__}, expected a dict")
    return value


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint folder (tensors on the CPU). FileNotFoundError when the folder or one of its
    files is missing, ValueError when a file is corrupt; both name the folder and the file."""
    folder = checked_checkpoint_folder(folder)
    record = read_checkpoint_record(folder)
    return Checkpoint(
        tensors=read_checkpoint_tensors(folder),
        optimizer_state=read_torch_file(folder, OPTIMIZER_FILE),
        state=read_torch_file(folder, STATE_FILE),
        config=record["config"],
        base_model=record.get("base_model"),
        earkit_version=record.get("earkit_version"),
        folder=folder,
    )


# ---------------------------------------------------------------- applying and exporting


def trainable_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The parameters that require grad, by full name: what save_checkpoint's tensors are."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


@torch.no_grad()
def apply_trainable(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy checkpoint tensors into the model's parameters of the same names (casting to each
    parameter's dtype and device). Every name is checked before anything is copied, so a
    ValueError (unknown names, shape mismatches) leaves the model as it was."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(name for name in tensors if name not in parameters)
    if unknown:
        raise ValueError(f"{len(unknown)} checkpoint tensor(s) are not parameters of this "
                         f"{type(model).__name__}: {some_of(unknown, 5)}")
    problems = []
    for name, tensor in tensors.items():
        parameter = parameters[name]
        if tensor.shape != parameter.shape:
            problems.append(f"{name}: checkpoint {tuple(tensor.shape)}, model {tuple(parameter.shape)}")
        elif tensor.is_floating_point() and not parameter.is_floating_point():
            problems.append(f"{name}: the model's parameter is {parameter.dtype} (quantized?), the checkpoint's "
                            f"{tensor.dtype}")
    if problems:
        raise ValueError(f"{len(problems)} checkpoint tensor(s) do not fit the model: " + "; ".join(problems[:5]))
    for name, tensor in tensors.items():
        parameters[name].copy_(tensor)


def erasure_tensors(model: torch.nn.Module, erasure) -> dict[str, Tensor] | None:
    """The tensors an erasure sets in `model` (apply_trainable takes them, FrozenTeacher swaps
    them): a checkpoint's trainable tensors; for a LoRA adapter folder (an `--adapter lora` run's
    checkpoint, or any PEFT LoRA folder) or an adapters.AdapterStack, the adapted weights merged
    (adapters.merged_weights); None for None."""
    from .adapters import AdapterStack, is_adapter_folder, merged_weights

    if erasure is None:
        return None
    if isinstance(erasure, AdapterStack):
        return merged_weights(model, erasure.folders, erasure.weights)
    if is_adapter_folder(erasure):
        return merged_weights(model, [erasure])
    return load_checkpoint(erasure).tensors


# A base folder's files that an export does not carry over: the weights, which the export's own replace.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                        "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def export_model(model, tokenizer, out_dir: str | os.PathLike, *, force: bool = False, base_folder=None) -> Path:
    """Write a full model folder, atomically, that opens as a Janus model does:
    JanusForConditionalGeneration.from_pretrained, AutoTokenizer and AutoProcessor.from_pretrained,
    and transformers' own generate(generation_mode="image").

    It holds save_pretrained of the model and the tokenizer; every other file of `base_folder`
    (the base model's folder: its processor files, chat template, notes...) that the export does
    not write, the weights excepted; a Janus processor where the base had none (the tokenizer
    and an image processor of the model's image size); and a generation config that names the
    pad and <begin_of_image> ids transformers' generate needs (the CFG pad earkit samples with,
    model.cfg_pad_id) where the base's names none.
    An existing out_dir is replaced only with force, and only if it is empty or an earlier earkit
    export holding nothing else (never a model folder somebody else wrote, the base model included)."""

    def write_into(partial: Path) -> None:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if base_folder is not None:
            carry_base_files(Path(base_folder), partial)
        if not any((partial / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
            janus_processor(model, tokenizer).save_pretrained(partial)
        complete_generation_config(model, tokenizer, partial / "generation_config.json")

    return write_folder_atomically(out_dir, write_into, force=force, kind="model export", what="model folder")


def carry_base_files(base: Path, export: Path) -> list[str]:
    """Copy every file under `base` that `export` lacks, but the weights; the names copied."""
    import fnmatch
    import json
    import shutil

    from .model import MODEL_NOTES, read_model_notes, rebased_judge

    copied = []
    for path in sorted(base.rglob("*")):
        relative = path.relative_to(base)
        if not path.is_file() or relative.parts[0].startswith(".") or (export / relative).exists():
            continue
        if len(relative.parts) == 1 and any(fnmatch.fnmatch(path.name, pattern) for pattern in WEIGHT_FILE_PATTERNS):
            continue
        (export / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative.as_posix() == MODEL_NOTES:
            # the notes' judge path is relative to the base folder: the export names the same judge
            notes = read_model_notes(base)
            if isinstance(notes.get("default_judge"), str):
                notes["default_judge"] = rebased_judge(notes["default_judge"], base)
            (export / relative).write_text(json.dumps(notes, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(path, export / relative)
        copied.append(relative.as_posix())
    return copied


def janus_processor(model, tokenizer):
    """A JanusProcessor for a model folder that has none: the tokenizer, and an image processor
    sized to the model's image input."""
    from transformers import JanusImageProcessor, JanusProcessor

    side = model.config.vision_config.image_size
    return JanusProcessor(image_processor=JanusImageProcessor(size={"height": side, "width": side}), tokenizer=tokenizer)


def complete_generation_config(model, tokenizer, path: Path) -> None:
    """The saved generation config, with what transformers' Janus generate reads and a model
    config may not carry: pad_token_id (earkit's CFG pad), bos/eos as the tokenizer has them
    where unset or only copied from the model config, and generation_kwargs.boi_token_id; no
    `_from_model_config` (with it set, generate rebuilds the config from the model config and
    loses generation_kwargs)."""
    import json

    from .model import cfg_pad_id, special_token_ids

    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    ids = special_token_ids(tokenizer)
    # ids copied from the model config (its text model's) need not be the tokenizer's: those win
    from_model_config = bool(record.pop("_from_model_config", False))
    record["pad_token_id"] = cfg_pad_id(model, tokenizer)
    if from_model_config or record.get("bos_token_id") is None:
        record["bos_token_id"] = ids["bos"]
    if (from_model_config or record.get("eos_token_id") is None) and tokenizer.eos_token_id is not None:
        record["eos_token_id"] = tokenizer.eos_token_id
    kwargs = dict(record.get("generation_kwargs") or {})
    kwargs.setdefault("boi_token_id", ids["boi"])
    record["generation_kwargs"] = kwargs
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def stored_dtype(source: str) -> torch.dtype:
    """The dtype a model folder (or hub id) was saved in, by its config; float32 when it says none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def export_checkpoint(base_model_source: str | os.PathLike | None, checkpoint_folder: str | os.PathLike,
                      out_dir: str | os.PathLike, *, force: bool = False,
                      dtype: str | torch.dtype | None = None, merge: bool = False) -> Path:
    """Base model + a checkpoint's trainable tensors -> a full model folder (see export_model).

    A LoRA adapter (an `--adapter lora` run's checkpoint, or any PEFT LoRA folder) is folded into
    the weights it adapts, and only with merge=True (`earkit export --merge`): the adapter
    folder itself is already what PeftModel.from_pretrained loads. base_model_source None uses
    the one the checkpoint (or the adapter's base_model_name_or_path) recorded. dtype None keeps
    the base model's stored dtype (its config), so a bf16 Janus-Pro exports in bf16, not float32.
    """
    from .adapters import is_adapter_folder, read_adapter_config
    from .model import check_model_source, load_janus

    checkpoint_folder = Path(checkpoint_folder).expanduser()
    adapter = is_adapter_folder(checkpoint_folder)
    if adapter and not merge:
        raise ValueError(f"{checkpoint_folder} is a LoRA adapter: give --merge (merge=True) to fold it into the "
                         "weights of a full model folder, or load the adapter folder as it is with PEFT")
    if merge and not adapter:
        raise ValueError(f"--merge folds a LoRA adapter into the weights; {checkpoint_folder} is not an adapter folder "
                         f"(no adapter_config.json): export a full checkpoint without --merge")
    if adapter:
        folder = checkpoint_folder
        recorded = read_adapter_config(folder).get("base_model_name_or_path")
        if (folder / CONFIG_FILE).is_file():  # an earkit adapter run's checkpoint records its base model too
            recorded = read_checkpoint_record(checked_checkpoint_folder(folder)).get("base_model") or recorded
    else:
        folder = checked_checkpoint_folder(checkpoint_folder)
        recorded = read_checkpoint_record(folder).get("base_model")
    source = base_model_source if base_model_source is not None else recorded
    if source is None:
        raise ValueError(f"checkpoint {folder} records no base model; give the base model source")
    out = Path(out_dir).expanduser()
    source = check_model_source(source)
    if Path(source).expanduser().exists() and Path(source).expanduser().resolve() == out.resolve():
        raise ValueError(f"the export's out folder {out} is the base model folder itself; choose another")
    # before spending minutes loading the base model
    check_replaceable(out, force=force, kind="model export", what="model folder")
    check_writable(out, "model folder")
    tensors = None if adapter else read_checkpoint_tensors(folder)
    model, tokenizer = load_janus(source, device="cpu", dtype=dtype if dtype is not None else stored_dtype(source))
    apply_trainable(model, erasure_tensors(model, folder) if adapter else tensors)
    base_folder = Path(source).expanduser() if Path(source).expanduser().is_dir() else cached_hub_folder(source)
    return export_model(model, tokenizer, out, force=force, base_folder=base_folder)


def cached_hub_folder(source: str) -> Path | None:
    """The local snapshot of a hub model (the files load_janus read), or None when there is none."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - no snapshot: the export holds what save_pretrained writes
        return None
