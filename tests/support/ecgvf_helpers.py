"""Small models and judges for the ECGVF tests: a ShapesWorld-shaped world in seconds, a tiny
open_clip with a weights file, and a judge whose verdicts the test decides."""

from __future__ import annotations

import json
import random
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np

EAR_DATA = Path(__file__).resolve().parents[3] / "shared" / "ear-data"

# A tiny open_clip: a 1-layer ViT over 8-pixel patches and a 1-layer text tower with CLIP's BPE vocabulary.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def build_tiny_world(folder: Path) -> Path:
    """WORLD/generator (a tiny random Janus over ShapesWorld's words, with the files build_world
    writes beside the model: prompt_vocabulary.json, earkit.json naming WORLD/judge) and WORLD/judge
    (a ShapesWorld judge trained for 3 steps), in seconds. Untrained: plumbing only. Its sampling
    is Janus-Pro's 5 and 1 (no generation_config.json defaults)."""
    import torch

    from earkit.engine.shapesworld import DEFAULT_JUDGE
    from earkit.engine.shapesworld import render as world
    from earkit.engine.shapesworld.generator import write_model_files
    from earkit.engine.tiny import save_tiny_janus
    from earkit.engine.shapesworld.judge import JudgeConfig, train_judge

    torch.manual_seed(0)
    save_tiny_janus(folder / "generator", world.vocabulary() + list(world.SHAPES) + ["shape"])
    write_model_files(folder / "generator", DEFAULT_JUDGE)
    train_judge(JudgeConfig(n_train_images=64, steps=3, batch_size=32, warmup_steps=1), progress=False).save(
        folder / "judge")
    return folder


def tiny_world_once(tmp_path_factory):
    """The body of a module-scoped `tiny_world` fixture (build_tiny_world, one thread):
    `tiny_world = pytest.fixture(scope="module", name="tiny_world")(tiny_world_once)`."""
    import torch

    torch.set_num_threads(1)
    return build_tiny_world(tmp_path_factory.mktemp("world"))


def build_tiny_open_clip(folder: Path) -> tuple[Path, Path]:
    """(model config .json, weights .pt) of a random tiny open_clip, as OpenClipJudge loads them."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny-test-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    weights = folder / "tiny-test-clip.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def rendered(shape: str, seed: int = 0):
    """A ShapesWorld image of `shape` that carries its shape in image.info (what StubJudge reads)."""
    from earkit.engine.shapesworld import render as world

    image = world.render(world.random_scene(random.Random(f"{shape}-{seed}"), shape=shape), 32)
    image.info["shape"] = shape
    return image


class StubJudge:
    """A judge that reads the truth from image.info["shape"] (rendered() puts it there), so every
    verdict is the one the test chose. Records what it was asked."""

    name = "stub"
    has_text = False
    concepts = ("circle", "square", "triangle", "star", "cross")

    def __init__(self):
        self.calls = []

    def knows(self, concept):
        return concept in self.concepts

    def check_concept(self, concept):
        if concept not in self.concepts:
            raise ValueError(f"the stub judge cannot judge {concept!r}")
        return concept

    def verdict(self, images, concept):
        images = list(images)
        self.calls.append((concept, images))
        seen = np.array([image.info.get("shape") == concept for image in images], dtype=bool)
        return seen.astype(np.float64) * 0.9 + 0.05, seen

    def features(self, images):
        return None

    def describe(self):
        return {"name": self.name}


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 answering with `handler` from a daemon thread while a
    `with` block runs; closing never waits for a handler still at work."""

    def __init__(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # never wait for a sleeping handler
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
