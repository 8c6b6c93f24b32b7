"""The generic engine knows no world by name: nothing outside engine/shapesworld/ tests whether a
model is ShapesWorld's. A ShapesWorld generator folder is driven by its data files like any Hugging
Face Janus folder (generation_config.json, earkit.json, prompt_vocabulary.json)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERIC = sorted([*(ROOT / "engine").glob("*.py"), *(ROOT / "ecgvf").rglob("*.py"), *(ROOT / "earkit").rglob("*.py")])
# What a test for ShapesWorld looks like: the removed is_shapesworld, a look into world.json, the
# sibling-folder judge convention, or ShapesWorld's sampling constants.
CHECKS = re.compile(r"is_shapesworld|world\.json|world_judge_folder|parent\s*/\s*[\"']judge[\"']|"
                    r"shapesworld import .*\b(GUIDANCE_SCALE|TEMPERATURE)\b|shapesworld\.(GUIDANCE_SCALE|TEMPERATURE)")

# Lines that name world.json for a reason other than telling models apart.
ALLOWED = {
    # `earkit world build` (ShapesWorld's own command) prints the build record it has just written
    ("earkit/cli/world.py", "print(f\"built ShapesWorld in {out}: {(out / 'world.json').read_text()}\")"),
}


def test_the_generic_modules_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in GENERIC}
    assert {"engine/sampler.py", "engine/model.py", "ecgvf/images.py", "ecgvf/judges.py", "ecgvf/pair_generation/backends.py",
            "earkit/cli/sample.py", "earkit/io.py"} <= names


@pytest.mark.parametrize("path", GENERIC, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_no_generic_module_tests_for_shapesworld(path):
    hits = [f"{number}: {line.strip()}" for number, line in enumerate(path.read_text().splitlines(), 1)
            if CHECKS.search(line) and (path.relative_to(ROOT).as_posix(), line.strip()) not in ALLOWED]
    assert not hits, f"{path.relative_to(ROOT)} tests for ShapesWorld by name:\n" + "\n".join(hits)
