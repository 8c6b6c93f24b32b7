"""The command's layout: one module per subcommand (add_arguments, run), erase's flags derived from
EraseConfig so that its help cannot drift from the dataclass, and `python -m earkit`."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from earkit import cli
from earkit.cli import erase as erase_command
from earkit.cli.arguments import add_config_arguments, add_sampling_arguments
from earkit.engine.trainer import EraseConfig


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_command_module_has_add_arguments_and_run(name):
    module = cli.command_module(name)
    assert callable(module.add_arguments) and callable(module.run)
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # builds a parser of its own


def erase_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["erase", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_erase_help_lists_every_eraseconfig_field_as_a_flag(capsys):
    handled_apart = {"model", "out", "resume", "force"}
    fields = [field.name for field in dataclasses.fields(EraseConfig)]
    assert list(erase_command.ERASE_FLAGS) == [name for name in fields if name not in handled_apart]
    text = erase_help(capsys)
    for name in fields:
        assert f"--{name.replace('_', '-')}" in text, name
    for field in dataclasses.fields(EraseConfig):
        if field.name not in handled_apart:
            assert field.metadata.get("help"), f"EraseConfig.{field.name} has no help"


def test_erase_flags_keep_their_types_and_none_spellings():
    parser = argparse.ArgumentParser()
    erase_command.add_arguments(parser)
    args = parser.parse_args(["--window", "12", "--lr", "3e-4", "--grad-clip", "none", "--token-threshold", "0.5",
                              "--trainable", "a.*", "--trainable", "b.*", "--gradient-checkpointing",
                              "--objective", "hidden-mse"])
    assert (args.window, args.lr, args.grad_clip, args.token_threshold) == (12, 3e-4, None, 0.5)
    assert args.trainable == ["a.*", "b.*"] and args.gradient_checkpointing is True
    assert args.objective == "hidden-mse" and args.eta is None and args.load_in_8bit is None
    given = erase_command.given_erase_fields(args, ["--grad-clip", "none", "--window", "12"])
    assert given["grad_clip"] is None and given["window"] == 12 and given["trainable"] == ("a.*", "b.*")
    assert "token_threshold" in given and "window_threshold" not in given
    assert set(erase_command.OPTIONAL_VALUE_FLAGS) == {"token_threshold", "window_threshold", "grad_clip"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "sgd"])


def test_erase_help_states_dataclass_and_shapesworld_defaults(capsys):
    from earkit.engine.shapesworld import SHAPESWORLD_ERASE

    text = " ".join(erase_help(capsys).split())
    assert f"default: {EraseConfig.window}; {SHAPESWORLD_ERASE['window']} for the ShapesWorld default" in text
    assert "none: no clipping" in text


def test_config_arguments_follow_any_dataclass():
    @dataclasses.dataclass
    class Settings:
        size: int = dataclasses.field(default=3, metadata={"help": "how big"})
        scale: float | None = dataclasses.field(default=None, metadata={"help": "how much", "none": "unscaled"})
        names: tuple[str, ...] = ("x",)
        loud: bool = False

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Settings, ["size", "scale", "names", "loud"])
    assert vars(parser.parse_args([])) == {"size": None, "scale": None, "names": None, "loud": None}
    args = parser.parse_args(["--size", "4", "--scale", "NONE", "--names", "y", "--loud"])
    assert (args.size, args.scale, args.names, args.loud) == (4, None, ["y"], True)
    text = parser.format_help()
    assert "how big (default: 3)" in text and "none: unscaled" in text


def test_sampling_arguments_are_one_set():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, seed=False, top_k_p=False)
    assert vars(parser.parse_args([])) == {"guidance_scale": None, "temperature": None, "dtype": "auto", "device": None}
    text = " ".join(parser.format_help().split())
    assert "generation_config.json, else 5" in text and "generation_config.json, else 1" in text


@pytest.mark.parametrize("module", ["earkit", "earkit.cli"])
def test_python_m_earkit_shows_the_commands(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in cli.COMMANDS:
        assert name in done.stdout
