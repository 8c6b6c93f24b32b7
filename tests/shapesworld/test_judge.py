"""The ShapesWorld judge: a tiny open_clip CLIP trained by earkit, judging shape and colour zero-shot.

The tiny-budget tests train a few steps (seconds) and check the plumbing: labels, save/load,
determinism, augmentation. The accuracy of the full-budget judge is tested on the shipped one
(tests/shapesworld/test_shapesworld.py).
"""

import json

import numpy as np
import pytest
import torch

from earkit.engine.shapesworld import render as world
from earkit.engine.shapesworld.judge import JudgeConfig, WorldJudge, WordTokenizer, train_judge

TINY = JudgeConfig(n_train_images=64, steps=3, batch_size=32, warmup_steps=1, seed=7)


@pytest.fixture(scope="module")
def tiny_judge():
    return train_judge(TINY, progress=False)


@pytest.fixture(scope="module")
def images():
    images, _, scenes = world.make_dataset(12, seed=99)
    return images, scenes


def test_classify_gives_valid_labels_and_probabilities(tiny_judge, images):
    array, _ = images
    judged = tiny_judge.classify(array)
    assert len(judged) == len(array)
    for result in judged:
        assert result["shape"] in world.SHAPES and result["colour"] in world.COLOURS
        assert set(result["shape_scores"]) == set(world.SHAPES)
        assert set(result["colour_scores"]) == set(world.COLOURS)
        assert sum(result["shape_scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(result["colour_scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert result["shape"] == max(result["shape_scores"], key=result["shape_scores"].get)


def test_pil_images_and_arrays_are_judged_the_same(tiny_judge, images):
    _, scenes = images
    pil = [world.render(scene) for scene in scenes[:4]]
    array = np.stack([np.asarray(image) for image in pil])
    assert tiny_judge.classify(pil) == tiny_judge.classify(array)
    assert tiny_judge.classify(pil[0]) == tiny_judge.classify(array[:1])


def test_shape_rate_is_the_share_judged_as_that_shape(tiny_judge, images):
    array, _ = images
    judged = [r["shape"] for r in tiny_judge.classify(array)]
    for shape in world.SHAPES:
        assert tiny_judge.shape_rate(array, shape) == pytest.approx(judged.count(shape) / len(judged))
    assert sum(tiny_judge.shape_rate(array, shape) for shape in world.SHAPES) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        tiny_judge.shape_rate(array, "dog")


def test_zero_shot_takes_arbitrary_prompts(tiny_judge, images):
    array, _ = images
    labels, probs = tiny_judge.zero_shot(array, ["a red circle", "a photo of a dog", "something blue"])
    assert labels == ["a red circle", "a photo of a dog", "something blue"]
    assert probs.shape == (len(array), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_save_and_load_give_identical_outputs(tiny_judge, images, tmp_path):
    array, _ = images
    tiny_judge.save(tmp_path)
    assert (tmp_path / "judge.safetensors").stat().st_size < 4 * 2**20
    meta = json.loads((tmp_path / "judge_config.json").read_text())
    assert {"model_config", "judge_config", "vocabulary", "label_prompts"} <= set(meta)
    loaded = WorldJudge.load(tmp_path)
    assert loaded.config == tiny_judge.config
    torch.testing.assert_close(loaded.encode_images(array), tiny_judge.encode_images(array), rtol=0, atol=0)
    assert loaded.classify(array) == tiny_judge.classify(array)
    for name, tensor in tiny_judge.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_training_is_deterministic_from_the_seed(tiny_judge):
    again = train_judge(TINY, progress=False)
    for name, tensor in tiny_judge.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_tokenizer_maps_unknown_words_and_ends_with_eot():
    tokenizer = WordTokenizer.for_shapesworld(context_length=8)
    tokens = tokenizer(["a red circle", "a photo of a zebra", "a very very very very long long caption"])
    assert tokens.shape == (3, 8)
    unk = tokenizer.vocab["<unk>"]
    assert unk not in tokens[0] and unk in tokens[1]
    assert (tokens == tokenizer.eot_id).sum(1).tolist() == [1, 1, 1]  # truncation keeps <eot>
    for word in ("circle", "background", "shape", "orange"):
        assert word in tokenizer.vocab


def test_blur_keeps_flat_images_and_sigma_zero_is_the_identity():
    from earkit.engine.shapesworld.judge import blur

    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    same = blur(pixels, torch.zeros(3))
    torch.testing.assert_close(same, pixels)
    flat = torch.full((2, 3, 16, 16), 0.25)
    torch.testing.assert_close(blur(flat, torch.tensor([0.7, 2.0])), flat)
    softened = blur(pixels, torch.full((3,), 1.5))
    assert softened.std() < pixels.std()  # high frequencies go


def test_roundtrip_images_join_the_training_pool(monkeypatch):
    seen = []

    def roundtrip(pixels):
        seen.append(len(pixels))
        return pixels.flip(-1)

    config = JudgeConfig(n_train_images=40, steps=1, batch_size=16, warmup_steps=1, seed=3, roundtrip_images=24)
    train_judge(config, progress=False, roundtrip=roundtrip)
    assert sum(seen) == 24
