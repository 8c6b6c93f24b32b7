"""Draw many images, on one process or on every rank of a torchrun job, and keep them as they come.

    jobs = [Job(prompt, seed, name) ...]                 # one image each, in a fixed order
    store = ImageStore(folder, drawing_identity(...))    # optional: images survive a killed run
    images = draw_images(model, tokenizer, jobs, batch_size=16, store=store)   # on rank 0; None elsewhere

The job list is cut into whole batches of batch_size, in order, the same batches at any world
size: batch b is drawn by rank b % world_size (of the batches still to draw), each image with its
own seed (engine/sampler.py), so every image comes out bit for bit as one process draws it. After
each round (one batch a rank) rank 0 gathers the round's images, writes them into the store and
moves the progress bar; the other ranks never write. With a store, a batch whose images are all
there already is not drawn again: a rerun of a killed job draws only what is missing.

The store's images.json says what the images were drawn with (model, checkpoint and its digest,
guidance, temperature, top-k/top-p, batch size, dtype, device type): a run with other settings is
refused by name rather than mixing two models' images in one folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from earkit.io import json_digest, parse_json, write_files_atomic

from . import distributed

STORE_RECORD = "images.json"
STORE_FORMAT = "earkit-images"


@dataclass(frozen=True)
class Job:
    """One image to draw: its prompt, its seed, and its file name in a store."""

    prompt: str
    seed: int
    name: str


def prompt_digest(prompt: str) -> str:
    """16 hex digits naming a prompt in file names (a prompt may hold any character)."""
    return json_digest(prompt)


def prompt_seed_jobs(prompts, seeds) -> list[Job]:
    """Every prompt with every seed, seed-major (all prompts with the first seed, then the next):
    so a run with more seeds draws the same first batches as one with fewer, and reuses them.
    Files are named by the prompt's digest and the seed: PROMPTDIGEST_sSEED.png."""
    return [Job(prompt, seed, f"{prompt_digest(prompt)}_s{seed}.png") for seed in seeds for prompt in prompts]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def drawing_identity(*, model, checkpoint=None, guidance_scale, temperature, top_k=None, top_p=None, batch_size,
                     dtype, device) -> dict:
    """What decides an image's pixels besides its prompt and seed: the model (its folder or hub id),
    the erasure checkpoint (its folder and the digest of its trainable tensors), the sampling
    settings, the batch size (a batch's logits may differ in the last bit from another batch's),
    and the dtype and device type the model computes in."""
    record = {"model": str(model), "checkpoint": None, "checkpoint_sha256": None,
              "guidance_scale": float(guidance_scale), "temperature": float(temperature), "top_k": top_k,
              "top_p": None if top_p is None else float(top_p), "batch_size": batch_size,
              "dtype": str(dtype).removeprefix("torch."), "device": str(device).split(":")[0]}
    if checkpoint is not None:
        record["checkpoint"], record["checkpoint_sha256"] = str(checkpoint), erasure_digest(checkpoint)
    return record


def erasure_digest(erasure) -> str | None:
    """The digest of what an erasure changes: a checkpoint's trainable tensors, an adapter's
    weights and config, or (a stack of adapters) each adapter's digest with its weight."""
    from earkit.io import json_digest

    from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterStack, is_adapter_folder

    if isinstance(erasure, AdapterStack):
        return json_digest([[erasure_digest(folder), weight] for folder, weight in zip(erasure.folders, erasure.weights)])
    folder = Path(erasure)
    if is_adapter_folder(folder):
        files = [folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG]
        return json_digest([file_digest(path) for path in files]) if all(path.is_file() for path in files) else None
    tensors = folder / "trainable.safetensors"
    return file_digest(tensors) if tensors.is_file() else None


class OtherSettings(ValueError):
    """A store holds images drawn with other settings than this run's (the message names one)."""


class ImageStore:
    """A folder of drawn images plus images.json, the identity they were drawn with.

    `check()` (before any drawing) refuses a folder that holds images of another identity, naming
    the first setting that differs, or files that are not a store's; `open()` creates the folder
    and its record (rank 0). Images are written whole (a temporary file renamed into place)."""

    def __init__(self, folder, identity: dict, *, what: str = "images folder", extra: dict | None = None):
        self.folder = Path(folder).expanduser()
        self.identity = dict(identity)
        self.extra = dict(extra or {})  # recorded beside the identity, not compared (e.g. planned file names)
        self.what = what

    @property
    def record_path(self) -> Path:
        return self.folder / STORE_RECORD

    def recorded_identity(self) -> dict | None:
        """The identity in the folder's images.json; None when there is none."""
        if not self.record_path.is_file():
            return None
        try:
            record = parse_json(self.record_path.read_text(encoding="utf-8"), str(self.record_path))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{self.what} {self.folder}: {STORE_RECORD} is unreadable ({error}); move the folder "
                             "away or choose another one") from None
        if not isinstance(record, dict) or record.get("format") != STORE_FORMAT or not isinstance(
                record.get("identity"), dict):
            raise ValueError(f"{self.what} {self.folder}: {STORE_RECORD} is not an earkit images record")
        return record["identity"]

    def check(self) -> bool:
        """Whether the folder already holds images of this identity (True: a run to continue).
        ValueError naming the setting that differs; FileExistsError when it holds other files."""
        if self.folder.exists() and not self.folder.is_dir():
            raise FileExistsError(f"{self.what} {self.folder} exists and is not a folder")
        recorded = self.recorded_identity()
        if recorded is None:
            if self.folder.is_dir() and any(self.folder.iterdir()):
                raise FileExistsError(f"{self.what} {self.folder} is not empty and holds no {STORE_RECORD}: "
                                      "it is not a folder of earkit's images; choose another one")
            return False
        for name in sorted(set(recorded) | set(self.identity)):
            if recorded.get(name) != self.identity.get(name):
                raise OtherSettings(
                    f"{self.what} {self.folder} holds images drawn with {name} {recorded.get(name)!r}; this run "
                    f"draws with {name} {self.identity.get(name)!r}: run with the same settings to continue it, "
                    "or use another folder")
        return True

    def open(self) -> None:
        """Create the folder and its record (rank 0, after check())."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.record_path.is_file():
            record = {"format": STORE_FORMAT, "identity": self.identity, **self.extra}
            text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
            write_files_atomic({self.record_path: text.encode("utf-8", "surrogatepass")})

    def has(self, name: str) -> bool:
        return (self.folder / name).is_file()

    def load(self, name: str):
        from PIL import Image

        with Image.open(self.folder / name) as image:
            return image.convert("RGB")

    def save(self, images: dict) -> None:
        """{file name: PIL image}, written whole and flushed to disk (earkit.io.write_files_atomic):
        a kill leaves no half image, so every image there is one a rerun may trust."""
        import io

        files = {}
        for name, image in images.items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            files[self.folder / name] = buffer.getvalue()
        write_files_atomic(files)


def batches_of(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    return [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]


def draw_images(model, tokenizer, jobs: list[Job], *, guidance_scale=None, temperature=None, top_k=None, top_p=None,
                batch_size: int = 16, store: ImageStore | None = None, progress: bool = True,
                desc: str = "drawing", keep: bool = True) -> list | None:
    """Every job's image (PIL, in job order) on rank 0, None on the other ranks; each rank draws
    its share of the batches (module docstring). The store, when given, must have been check()ed;
    rank 0 opens it. keep=False (with a store): the images go to the store only and None is
    returned, so that 30,000 images never sit in memory at once. guidance_scale / temperature
    None: the model's generation_config."""
    from tqdm.auto import tqdm

    from .sampler import decode_images, sample_image_tokens

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not keep and store is None:
        raise ValueError("keep=False needs a store: the images would go nowhere")
    names = [job.name for job in jobs]
    if store is not None and len(set(names)) != len(names):
        raise ValueError("two jobs share a file name: each image of a store needs its own")
    ranks = distributed.current()
    batches = batches_of(list(jobs), batch_size)
    to_draw = None
    if ranks.main:
        if store is not None:
            store.open()
        to_draw = [index for index, batch in enumerate(batches)
                   if store is None or not all(store.has(job.name) for job in batch)]
    to_draw = distributed.broadcast_from_main(to_draw, "agreeing on the batches to draw")

    drawn: dict[int, object] = {}  # batch index -> its images (rank 0)
    already = len(jobs) - sum(len(batches[index]) for index in to_draw)
    bar = tqdm(total=len(jobs), initial=already, desc=desc, unit="image", disable=not (progress and ranks.main))
    with bar:
        for round_start in range(0, len(to_draw), ranks.world_size):
            position = round_start + ranks.rank
            mine = to_draw[position] if position < len(to_draw) else None
            images = None
            if mine is not None:
                batch = batches[mine]
                tokens = sample_image_tokens(model, tokenizer, [job.prompt for job in batch],
                                             seeds=[job.seed for job in batch], guidance_scale=guidance_scale,
                                             temperature=temperature, top_k=top_k, top_p=top_p, progress=False)
                images = decode_images(model, tokens)
            parts = distributed.gather_to_main((mine, images), "gathering the drawn images")
            if not ranks.main:
                continue
            for index, batch_images in parts:
                if index is None:
                    continue
                if store is not None:
                    store.save({job.name: image for job, image in zip(batches[index], batch_images)})
                if keep:
                    drawn[index] = batch_images
                bar.update(len(batch_images))
    if not ranks.main or not keep:
        return None
    result = []
    for index, batch in enumerate(batches):
        result.extend(drawn[index] if index in drawn else [store.load(job.name) for job in batch])
    return result
