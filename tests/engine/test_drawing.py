"""engine/drawing.py in one process: whole batches in order, the image store and its identity,
and a rerun that draws only what is missing. (Two ranks: tests/ecgvf/test_distributed.py.)"""

import json

import pytest
import torch

import earkit.engine.sampler as sampler
from earkit.engine.drawing import (
    ImageStore, Job, STORE_RECORD, batches_of, draw_images, drawing_identity, prompt_digest, prompt_seed_jobs,
)
from earkit.engine.tiny import build_tiny_janus, sharpen, words_of

PROMPTS = ["a red circle", "a blue square", "a green star"]


@pytest.fixture(scope="module")
def janus():
    model, tokenizer = build_tiny_janus(words_of(PROMPTS))
    return sharpen(model), tokenizer


def identity(**changes):
    settings = dict(model="tiny", guidance_scale=5.0, temperature=1.0, batch_size=2, dtype=torch.float32, device="cpu")
    return drawing_identity(**{**settings, **changes})


def test_jobs_are_seed_major_and_named_by_prompt_and_seed():
    jobs = prompt_seed_jobs(PROMPTS[:2], [7, 8])
    assert [(job.prompt, job.seed) for job in jobs] == [(PROMPTS[0], 7), (PROMPTS[1], 7), (PROMPTS[0], 8),
                                                        (PROMPTS[1], 8)]
    assert jobs[0].name == f"{prompt_digest(PROMPTS[0])}_s7.png" and len(prompt_digest("x")) == 16
    assert [len(batch) for batch in batches_of(jobs, 3)] == [3, 1]


def test_draw_images_gives_each_job_the_image_of_its_seed(janus):
    model, tokenizer = janus
    jobs = prompt_seed_jobs(PROMPTS, [0, 1])
    images = draw_images(model, tokenizer, jobs, batch_size=4, progress=False)
    assert len(images) == 6
    alone = sampler.decode_images(model, sampler.sample_image_tokens(model, tokenizer, [PROMPTS[2]], seeds=[1],
                                                                     progress=False))[0]
    # the same tokens; the VQ decoder, run on a batch of two or of one, may round a pixel apart
    difference = (torch.tensor(list(images[5].tobytes())) - torch.tensor(list(alone.tobytes()))).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99
    with pytest.raises(ValueError, match="batch_size"):
        draw_images(model, tokenizer, jobs, batch_size=0)


def test_the_store_keeps_images_and_a_rerun_draws_only_what_is_missing(janus, tmp_path, monkeypatch):
    model, tokenizer = janus
    jobs = prompt_seed_jobs(PROMPTS, [0, 1])
    store = ImageStore(tmp_path / "images", identity())
    assert store.check() is False  # nothing there yet
    first = draw_images(model, tokenizer, jobs, batch_size=4, store=store, progress=False)
    record = json.loads((tmp_path / "images" / STORE_RECORD).read_text())
    assert record["format"] == "earkit-images" and record["identity"] == identity()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted([job.name for job in jobs] + [STORE_RECORD])

    (tmp_path / "images" / jobs[5].name).unlink()  # the second batch is now incomplete: drawn again, whole
    drawn = []
    real = sampler.sample_image_tokens
    monkeypatch.setattr(sampler, "sample_image_tokens", lambda *a, **k: drawn.append(a[2]) or real(*a, **k))
    again = ImageStore(tmp_path / "images", identity())
    assert again.check() is True
    second = draw_images(model, tokenizer, jobs, batch_size=4, store=again, progress=False)
    assert drawn == [[PROMPTS[1], PROMPTS[2]]]
    assert [image.tobytes() for image in first] == [image.tobytes() for image in second]


@pytest.mark.parametrize("change, name", [
    (dict(guidance_scale=2.0), "guidance_scale"), (dict(temperature=0.5), "temperature"),
    (dict(batch_size=3), "batch_size"), (dict(model="other"), "model"), (dict(dtype=torch.bfloat16), "dtype"),
    (dict(top_k=5), "top_k"),
])
def test_images_of_other_settings_are_refused_by_name(tmp_path, change, name):
    ImageStore(tmp_path, identity()).open()
    with pytest.raises(ValueError, match=f"drawn with {name} .*this run draws with {name}"):
        ImageStore(tmp_path, identity(**change)).check()


def test_a_checkpoint_is_known_by_its_tensors(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "trainable.safetensors").write_bytes(b"one")
    store = tmp_path / "images"
    ImageStore(store, identity(checkpoint=checkpoint)).open()
    (checkpoint / "trainable.safetensors").write_bytes(b"two")  # retrained in the same folder
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        ImageStore(store, identity(checkpoint=checkpoint)).check()


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="holds no images.json"):
        ImageStore(tmp_path, identity()).check()
    (tmp_path / STORE_RECORD).write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not an earkit images record"):
        ImageStore(tmp_path, identity()).check()
    (tmp_path / STORE_RECORD).write_text('{"format": ')
    with pytest.raises(ValueError, match="unreadable"):
        ImageStore(tmp_path, identity()).check()
    with pytest.raises(FileExistsError, match="not a folder"):
        ImageStore(tmp_path / "thesis.tex", identity()).check()


def test_two_jobs_with_one_file_name_are_refused(janus, tmp_path):
    model, tokenizer = janus
    jobs = [Job("a red circle", 0, "same.png"), Job("a blue square", 1, "same.png")]
    with pytest.raises(ValueError, match="share a file name"):
        draw_images(model, tokenizer, jobs, store=ImageStore(tmp_path, identity()), progress=False)
