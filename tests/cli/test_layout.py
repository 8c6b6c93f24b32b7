"""The command's layout: one module per subcommand (add_arguments, run), erase's flags derived from
EraseConfig so that its help cannot drift from the dataclass, and `python -m earkit`."""

import argparse
import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import earkit.ecgvf
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


def test_no_ecgvf_module_holds_command_code():
    """The commands live in earkit/cli: the library defines no add_*_arguments and no run/run_* of
    a command (one taking the parsed `args`; run_attacks, a library function, takes its values)."""
    folder = Path(earkit.ecgvf.__file__).parent
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            takes_args = [argument.arg for argument in node.args.args[:1]] == ["args"]
            if re.fullmatch(r"add_\w*arguments", node.name) or (re.fullmatch(r"run(_\w+)?", node.name) and takes_args):
                found.append(f"{path.relative_to(folder)}: {node.name}")
    assert not found, found
    assert not (folder / "pair_generation" / "command.py").exists()
    assert not [name for name in earkit.ecgvf.__all__ if name.startswith(("add_", "run_"))]


def checkpoint_argv(command: str, tmp_path) -> list[str]:
    """`earkit COMMAND` up to the checkpoint, on a one-pair file and a model folder that is never loaded."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"concept_prompt": "a red circle", "anchor_prompt": "a red square"}) + "\n")
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    if command == "eval":
        return ["eval", "--model", str(model), "--benchmark", str(pairs), "--concept", "circle",
                "--out", str(tmp_path / "report")]
    return ["filter", "--model", str(model), "--pairs", str(pairs), "--out", str(tmp_path / "kept.jsonl")]


@pytest.mark.parametrize("command", ["eval", "filter"])
def test_delta_is_the_hidden_deprecated_name_of_checkpoint(command, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "--checkpoint" in text and "--delta" not in text
    missing = tmp_path / "no-such-checkpoint"
    with pytest.warns(FutureWarning, match="--delta is deprecated: it is --checkpoint now"):
        assert cli.main(checkpoint_argv(command, tmp_path) + ["--delta", str(missing)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"--checkpoint {missing} does not exist" in error[0], error  # --delta's value is used

    assert cli.main(checkpoint_argv(command, tmp_path) + ["--delta", str(missing), "--checkpoint", str(missing)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--delta is the old name of --checkpoint: give --checkpoint only" in error[0], error
    assert not (tmp_path / "report").exists() and not (tmp_path / "kept.jsonl").exists()


@pytest.mark.parametrize("old, new", [("--min-original-rate", "--min-concept-prompt-rate"),
                                      ("--max-replacement-rate", "--max-anchor-prompt-rate")])
def test_filter_takes_its_old_rate_flags_with_a_warning(old, new, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["filter", "--help"])
    assert old not in capsys.readouterr().out
    argv = ["filter", "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "kept.jsonl")]
    with pytest.warns(FutureWarning, match=f"{old} is deprecated: it is {new} now"):
        assert cli.main(argv + [old, "1.5"]) == 2  # the value reaches the rules, which refuse a share above 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "1.5" in error[0], error
    assert cli.main(argv + [old, "0.5", new, "0.5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{old} is the old name of {new}: give {new} only" in error[0], error


@pytest.mark.parametrize("command", ["eval", "filter"])
def test_the_judge_default_is_the_one_the_model_folder_names(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the judge the model folder's earkit.json names" in text


def test_sample_prompts_file_help_names_every_prompt_file_form(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(kind in text for kind in (".txt, one prompt per line", ".json", ".jsonl", ".csv")), text
