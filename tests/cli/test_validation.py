"""Bad input to the commands ends in one line naming it, exit 2, before any model loads and
before any output exists; a NaN checkpoint is refused; help states the defaults the code applies."""

import json

import pytest
import torch

from earkit.cli import main as cli_main
from earkit.engine import checkpoint
from earkit.engine import model as model_module
from earkit.engine.tiny import save_tiny_janus
from helpers import usage_error

VOCABULARY = ["red", "circle", "blue", "square"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "janus"
    save_tiny_janus(folder, VOCABULARY)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads a model before finding its bad input."""
    def load_janus(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    from earkit.engine import trainer

    monkeypatch.setattr(model_module, "load_janus", load_janus)
    monkeypatch.setattr(trainer, "load_janus", load_janus)  # bound at import there


def commands(tmp_path, model, out):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"concept_prompt": "a red circle", "anchor_prompt": "a red square"}) + "\n")
    return {
        "sample": ["sample", "--model", str(model), "--prompt", "a red circle", "--out", str(out)],
        "erase": ["erase", "--model", str(model), "--concept", "circle", "--anchor", "square", "--out", str(out)],
        "default erase": ["erase", "--out", str(out)],
        "filter": ["filter", "--model", str(model), "--pairs", str(pairs), "--judge", "shapesworld",
                   "--out", str(out / "kept.jsonl")],
        "eval": ["eval", "--model", str(model), "--benchmark", str(pairs), "--concept", "circle",
                 "--judge", "shapesworld", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["sample", "erase", "default erase", "filter", "eval"])
@pytest.mark.parametrize("device, expect", [("nonsense", "is not a device name"), ("cuda:7", "cuda:7")])
def test_a_bad_device_is_named_before_anything_loads(tmp_path, tiny_model, capsys, no_loading, command, device,
                                                    expect):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.fail("this test needs a machine with fewer than 8 GPUs")
    out = tmp_path / "out"
    error = usage_error(capsys, commands(tmp_path, tiny_model, out)[command] + ["--device", device])
    assert expect in error and "device" in error
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "erase", "default erase", "filter", "eval"])
def test_a_negative_temperature_is_named_before_anything_loads(tmp_path, tiny_model, capsys, no_loading, command):
    out = tmp_path / "out"
    error = usage_error(capsys, commands(tmp_path, tiny_model, out)[command] + ["--temperature", "-1"])
    assert "temperature" in error
    assert not out.exists()


def test_check_device_accepts_what_exists():
    assert model_module.check_device("cpu") == torch.device("cpu")
    assert model_module.check_device(None) == model_module.default_device()
    with pytest.raises(ValueError, match="not a device name"):
        model_module.check_device("gpu please")


def nan_checkpoint(folder, model):
    from earkit.engine.tiny import build_tiny_janus
    from earkit.engine.trainer import select_trainable

    skeleton, _ = build_tiny_janus(VOCABULARY)
    tensors = {name: torch.full_like(p, float("nan")) for name, p in
               select_trainable(skeleton, ["*layers.0.self_attn.q_proj*"]).items()}
    checkpoint.save_checkpoint(folder, tensors=tensors, optimizer_state={}, state={"step": 1}, config={},
                               base_model=model)
    return folder


def test_a_nan_checkpoint_is_refused_by_sample_and_export(tmp_path, tiny_model, capsys):
    broken = nan_checkpoint(tmp_path / "broken", tiny_model)
    error = usage_error(capsys, ["sample", "--model", str(tiny_model), "--checkpoint", str(broken),
                                    "--prompt", "a red circle", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert "NaN or infinite" in error and "q_proj" in error
    error = usage_error(capsys, ["export", "--model", str(tiny_model), "--checkpoint", str(broken),
                                    "--out", str(tmp_path / "e")])
    assert "NaN or infinite" in error
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_a_binary_prompts_file_is_named(tmp_path, capsys, no_loading):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    error = usage_error(capsys, ["sample", "--prompts-file", str(binary), "--out", str(tmp_path / "o")])
    assert str(binary) in error and "UTF-8" in error


@pytest.mark.parametrize("command", ["filter", "eval", "sample"])
def test_help_states_the_sampling_defaults_the_code_applies(capsys, command):
    """The model's generation_config.json holds its sampling defaults (ShapesWorld's too), else
    Janus-Pro's: the help says so, in the sampler's numbers, and names no world's."""
    from earkit.engine.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_TEMPERATURE

    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"CFG scale (default: the model's generation_config.json, else {DEFAULT_GUIDANCE_SCALE:g})" in text
    assert f"(default: the model's generation_config.json, else {DEFAULT_TEMPERATURE:g})" in text
    assert "generation_config.json, else 5" in text and "generation_config.json, else 1" in text
    assert "ShapesWorld generator" not in text


def test_words_the_tokenizer_does_not_know_are_named(tmp_path, capsys):
    from earkit.engine.shapesworld import generator_folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(generator_folder())
    with pytest.warns(UserWarning, match="does not know 'hexagon'"):
        model_module.encode_prompts(tokenizer, ["a purple hexagon"])
    with pytest.warns(UserWarning, match="does not know 'dodecahedron'"):
        assert cli_main(["sample", "--prompt", "a red dodecahedron", "--out", str(tmp_path / "s")]) == 0


def test_the_command_line_shows_a_warning_as_one_line():
    from earkit.cli import one_line_warning

    assert one_line_warning(UserWarning("prompt 'x': ..."), UserWarning, "/some/file.py", 12) == (
        "earkit: warning: prompt 'x': ...\n")
