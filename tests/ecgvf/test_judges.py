"""ECGVF judges: each one's verdict agrees with the model underneath it, and bad specs fail by name."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ecgvf_helpers import build_tiny_open_clip, rendered, tiny_world_once
from earkit.ecgvf.judges import (
    NUDENET_LABELS, NudeNetJudge, OpenClipJudge, ResNet50Judge, ShapesWorldJudge, parse_judge,
)


tiny_world = pytest.fixture(scope="module", name="tiny_world")(tiny_world_once)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_open_clip(tmp_path_factory.mktemp("clip"))


def images():
    return [rendered(shape, seed) for seed, shape in enumerate(["circle", "square", "star", "circle"])]


def test_shapesworld_judge_agrees_with_the_world_judge(tiny_world):
    judge = parse_judge(None, model_folder=tiny_world / "generator")  # named by the generator's earkit.json
    assert isinstance(judge, ShapesWorldJudge) and judge.folder == str(tiny_world / "judge")
    assert parse_judge("shapesworld", model_folder=tiny_world / "generator").folder == judge.folder
    verdicts = judge.world_judge.classify(images())
    scores, seen = judge.verdict(images(), "circle")
    assert seen.tolist() == [v["shape"] == "circle" for v in verdicts]
    np.testing.assert_allclose(scores, [v["shape_scores"]["circle"] for v in verdicts], rtol=1e-5)
    colour_scores, _ = judge.verdict(images(), "red")
    np.testing.assert_allclose(colour_scores, [v["colour_scores"]["red"] for v in verdicts], rtol=1e-5)
    assert judge.features(images()).shape[0] == 4 and judge.embed_texts(["a circle"]).shape[0] == 1
    with pytest.raises(ValueError, match="cannot judge 'church'"):
        judge.verdict(images(), "church")


def test_open_clip_judge_from_a_config_file_and_local_weights(tiny_clip):
    config, weights = tiny_clip
    judge = parse_judge(f"openclip:{config}:{weights}", labels=["circle", "square"])
    assert isinstance(judge, OpenClipJudge) and judge.labels == ["circle", "square"]
    scores, seen = judge.verdict(images(), "star")  # a new concept joins the labels
    assert judge.labels == ["circle", "square", "star"]
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    # seen is top-1: recompute the zero-shot probabilities by hand
    texts = judge.embed_texts([f"a photo of a {label}" for label in judge.labels])
    logits = float(judge.model.logit_scale.exp()) * judge.embed_images(images()) @ texts.T
    assert seen.tolist() == (logits.argmax(1) == 2).tolist()
    assert judge.features(images()).shape == (4, 16)
    with pytest.raises(FileNotFoundError, match="weights file"):
        parse_judge(f"openclip:{config}:{weights}.missing")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        parse_judge(f"openclip:no-such-model:{weights}")
    with pytest.raises(ValueError, match="openclip:NAME:WEIGHTS"):
        parse_judge("openclip:onlyname")


def test_resnet50_judge_reads_a_local_state_dict(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    torch.manual_seed(0)
    weights = tmp_path / "resnet50.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in resnet50(weights=None).state_dict().items()},
              str(weights))
    judge = parse_judge(f"resnet50:{weights}")
    assert isinstance(judge, ResNet50Judge)
    assert judge.class_index("church") == 497 and judge.class_index("497") == 497 and judge.knows("cinema")
    logits, features = judge.forward(images()[:2])
    scores, seen = judge.verdict(images()[:2], "church")
    assert seen.tolist() == (logits.argmax(1) == 497).tolist() and features.shape == (2, 2048)
    with pytest.raises(ValueError, match="cannot judge 'circle shape'"):
        judge.verdict(images()[:1], "circle shape")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read weights file"):
        ResNet50Judge(tmp_path / "bad.pt")


def test_nudenet_judge_counts_the_nine_exposed_labels():
    judge = parse_judge("nudenet")
    assert isinstance(judge, NudeNetJudge) and judge.threshold == 0.6
    assert judge.labels_for("nudity") == list(NUDENET_LABELS) and judge.labels_for("feet") == ["FEET_EXPOSED"]
    detections = [[{"class": "FEET_EXPOSED", "score": 0.7}], [{"class": "FACE_FEMALE", "score": 0.95}],
                  [{"class": "BELLY_EXPOSED", "score": 0.55}]]
    scores, seen = judge.verdict_from_detections(detections, "nudity")
    assert scores.tolist() == [0.7, 0.0, 0.55] and seen.tolist() == [True, False, False]
    # the real detector runs on generated images: a rendered shape shows no exposed body part
    scores, seen = judge.verdict(images()[:2], "nudity")
    assert scores.shape == (2,) and not seen.any()
    with pytest.raises(ValueError, match="cannot judge 'church'"):
        judge.verdict(images()[:1], "church")


def test_a_model_folder_names_its_default_judge_by_data(tiny_clip, tmp_path):
    """Not by layout: a judge/ folder beside a generator that names no judge is not taken."""
    from earkit.engine.model import write_model_notes

    config, weights = tiny_clip
    model = tmp_path / "world" / "generator"
    model.mkdir(parents=True)
    (tmp_path / "world" / "judge").mkdir()
    (tmp_path / "world" / "judge" / "judge_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--judge is needed: the model .* names no default judge"):
        parse_judge(None, model_folder=model)
    # any judge form; a relative path in it is read against the model folder, not the working folder
    relative = Path("..") / ".." / "clip"
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / weights.name).write_bytes(weights.read_bytes())
    write_model_notes(model, default_judge=f"openclip:{config}:{relative / weights.name}")
    judge = parse_judge(None, model_folder=model, labels=["circle"])
    assert isinstance(judge, OpenClipJudge) and judge.weights == str(tmp_path / "clip" / weights.name)
    with pytest.raises(FileNotFoundError, match="no ShapesWorld judge named by the model"):
        parse_judge("shapesworld", model_folder=model)  # it names a judge, but not a ShapesWorld one
    (model / "earkit.json").write_text('{"default_judge": "nudenet"}')
    with pytest.raises(ValueError, match="not earkit model notes"):
        parse_judge(None, model_folder=model)


def test_judge_specs_fail_by_name(tmp_path):
    with pytest.raises(ValueError, match="--judge is needed"):
        parse_judge(None, model_folder=tmp_path)
    with pytest.raises(ValueError, match="--judge is needed"):
        parse_judge(None, model_folder="deepseek-community/Janus-Pro-7B")  # a hub id names none
    with pytest.raises(FileNotFoundError, match="no ShapesWorld judge"):
        parse_judge("shapesworld", model_folder=tmp_path)
    with pytest.raises(ValueError, match="expected one of"):
        parse_judge("inception")
    with pytest.raises(FileNotFoundError, match="judge_config.json"):
        parse_judge(f"shapesworld:{tmp_path}")


# ---------------------------------------------------------------- preprocessing through torchvision's presets


def hand_resnet50_pixels(image) -> np.ndarray:
    """The judge's former hand-written preprocessing: shorter side to 256 (bilinear), centre 224, ImageNet mean/std."""
    from PIL import Image

    width, height = image.size
    scale = 256 / min(width, height)
    image = image.resize((max(224, round(width * scale)), max(224, round(height * scale))), Image.Resampling.BILINEAR)
    left, top = (image.size[0] - 224) // 2, (image.size[1] - 224) // 2
    array = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    array = (array - np.array((0.485, 0.456, 0.406), np.float32)) / np.array((0.229, 0.224, 0.225), np.float32)
    return array.transpose(2, 0, 1)


def hand_inception_pixels(image) -> np.ndarray:
    from PIL import Image

    array = np.asarray(image.resize((299, 299), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.array((0.485, 0.456, 0.406), np.float32)) / np.array((0.229, 0.224, 0.225), np.float32)
    return array.transpose(2, 0, 1)


def test_judge_preprocessing_through_torchvision_presets_matches_the_hand_written_numbers():
    from PIL import Image

    from earkit.ecgvf.judges import batch_of, inception_transform, resnet50_transform

    rng = np.random.default_rng(0)
    # square (the generators' images: ShapesWorld 64, Janus-Pro 384) and two non-square sizes whose
    # long side torchvision's int() and the old round() agree on; the preset truncates the long side
    # where the old code rounded, so some sizes (333 x 250: 340 against 341) differ by one column
    sizes = [(64, 64), (384, 384), (300, 200), (200, 500)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images.append(rendered("star", 3).convert("L"))  # greyscale: made RGB first
    for transform, by_hand, side in ((resnet50_transform(), hand_resnet50_pixels, 224),
                                     (inception_transform(), hand_inception_pixels, 299)):
        batch = batch_of(images, transform, "cpu")
        assert batch.shape == (len(images), 3, side, side) and batch.dtype == torch.float32
        expected = np.stack([by_hand(image.convert("RGB")) for image in images])
        np.testing.assert_allclose(batch.numpy(), expected, rtol=0, atol=1e-6)  # ResNet: 0; Inception: 7e-7 (float order)
