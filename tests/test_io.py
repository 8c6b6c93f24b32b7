"""earkit.io: reading outside JSON and prompt files, writing files and folders atomically, and the
--force checks. Other test files cover these through the commands; here each piece on its own."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from earkit import io as earkit_io
from earkit.cli import main as cli_main
from earkit.ecgvf.benchmark import load_prompt_file
from earkit.engine.pair_files import load_prompts
from earkit.io import (
    MANIFEST_FILE, NestedTooDeeply, UnreadableJSON, check_new_files, check_replaceable, check_writable, parse_json,
    read_prompt_records, read_prompts, read_text_file, recover_interrupted_save, write_files_atomic,
    write_folder_atomically, write_text_atomic,
)

# ---------------------------------------------------------------- reading JSON and text


def test_parse_json_names_its_source_for_every_failure():
    assert parse_json('{"a": [1, 2]}', "reply") == {"a": [1, 2]}
    assert parse_json('x [1] y', "reply", start=2) == ([1], 5)
    with pytest.raises(json.JSONDecodeError):
        parse_json("{", "reply")
    with pytest.raises(NestedTooDeeply, match="server reply: JSON nested too deeply"):
        parse_json("[" * 100000, "server reply")
    with pytest.raises(UnreadableJSON, match="file.json line 3: a JSON number too long"):
        parse_json("9" * 5000, "file.json line 3")


def test_read_text_file_refuses_what_is_not_a_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\n")  # a byte-order mark is dropped
    assert read_text_file(path, "prompt file") == "a cat\n"
    with pytest.raises(FileNotFoundError, match="prompt file .*missing.txt does not exist"):
        read_text_file(tmp_path / "missing.txt", "prompt file")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_text_file(tmp_path, "prompt file")
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_file(path, "prompt file")
    path.write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty"):
        read_text_file(path, "prompt file")


# ---------------------------------------------------------------- prompt files

PROMPTS = ["a cinema at night", "a red circle", "a supermarket"]

# One prompt list in every form a prompt file takes.
FORMS = {
    "prompts.txt": "a cinema at night\n\n  a red circle  \na supermarket\n",
    "no_suffix": "a cinema at night\na red circle\na supermarket\n",
    "strings.json": json.dumps(PROMPTS),
    "records.json": json.dumps([{"prompt": p, "case": i} for i, p in enumerate(PROMPTS)], indent=1),
    "lines.json": "\n".join(json.dumps({"prompt": p}) for p in PROMPTS),  # one object per line in a .json
    "records.jsonl": "\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n\n",
    "strings.jsonl": "\n".join(json.dumps(p) for p in PROMPTS),
    "list.jsonl": json.dumps(PROMPTS),  # a .jsonl holding one JSON list
    "sniffed_list": json.dumps(PROMPTS),
    "sniffed_lines": "\n".join(json.dumps({"prompt": p}) for p in PROMPTS),
    "pairs.jsonl": "\n".join(json.dumps({"concept_prompt": f"a church {i}", "anchor_prompt": p})
                             for i, p in enumerate(PROMPTS)),  # pairs: their anchor prompts
    "ear_pairs.json": json.dumps([{"original_prompt": "a church", "modified_prompt": p} for p in PROMPTS]),
    "eval.csv": ",case_number,prompt,seed\n" + "".join(f"{i},{i},{p},7\n" for i, p in enumerate(PROMPTS)),
    "spaced.csv": " prompt \n" + "".join(f'"{p}"\n' for p in PROMPTS) + ",\n",  # header stripped, blank row skipped
    "pairs.csv": "unsafe_prompt,safe_prompt\n" + "".join(f"a church,{p}\n" for p in PROMPTS),
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_every_form_of_prompt_file_reads_the_same_prompts(tmp_path, name):
    path = tmp_path / name
    path.write_text(FORMS[name])
    assert read_prompts(path) == PROMPTS


@pytest.mark.parametrize("name", sorted(FORMS))
def test_the_three_readers_of_prompt_files_agree(tmp_path, name, capsys):
    """erase --preserve (load_prompts), eval --benchmark/--preserve (load_prompt_file) and sample
    --prompts-file read every prompt file alike."""
    path = tmp_path / name
    path.write_text(FORMS[name])
    assert load_prompts(path) == [p.prompt for p in load_prompt_file(path)] == read_prompts(path) == PROMPTS


def test_sample_reads_its_prompts_file_as_every_prompt_file(tmp_path, capsys):
    bad = tmp_path / "prompts.json"
    bad.write_text('["a red circle", 3]')
    assert cli_main(["sample", "--prompts-file", str(bad), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "prompts.json entry 2 (line 1)" in error and "got int" in error
    assert not (tmp_path / "out").exists()


def test_records_keep_their_other_fields_and_repeats(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": " a star ", "concept": "star"}\n{"prompt": "a star"}\n')
    assert read_prompt_records(path) == [(f"{path} line 1", {"prompt": "a star", "concept": "star"}),
                                         (f"{path} line 2", {"prompt": "a star"})]
    path = tmp_path / "blank_prompt.json"
    path.write_text('[{"prompt": "  ", "anchor_prompt": "a square"}]')  # a blank prompt: the anchor prompt
    assert read_prompts(path) == ["a square"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "  \n", "is empty"),
    ("empty_list.json", "[]", "holds no prompts"),
    ("header_only.csv", "prompt\n", "holds no prompts"),
    ("nothing.jsonl", '{"prompt": "a"}\n{"concept_prompt": "a church"}\n', "line 2: no prompt"),
    ("blank.json", '["a cinema", "  "]', r"entry 2 \(line 1\): no prompt"),
    ("number.json", '[{"prompt": "a cinema"},\n 3]', r"entry 2 \(line 2\): expected a prompt or an object"),
    ("not_text.jsonl", '{"prompt": 3}\n', "line 1: 'prompt' must be a string, got int"),
    ("surrogate.jsonl", '{"prompt": "a \\ud800"}\n', "line 1: 'prompt' is not valid Unicode"),
    ("malformed.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2: malformed JSON"),
    ("malformed.json", '[\n{"prompt": "a"},\n]', "line 3: malformed JSON"),
    ("object.json", '{\n "prompt": "a"\n}', "line 1: malformed JSON"),
    ("top_level.json", '"a cinema"', "line 1: the top level is a str"),
    ("deep.json", "[" * 100000, "nested too deeply"),
    ("deep.jsonl", '{"prompt": "a"}\n' + "[" * 100000, "line 2: JSON nested too deeply"),
    ("columns.csv", "case,seed\n1,2\n", "line 1: the header .* has no prompt column"),
    ("comma.csv", "prompt,seed\na cat, sitting,1\n", "line 2: 3 fields, the header has 2"),
    ("huge.csv", "prompt\n" + "x" * 200000, "line 2: malformed CSV .*field larger than field limit"),
])
def test_prompt_file_errors_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    for reader in (read_prompts, load_prompts, load_prompt_file):
        with pytest.raises(ValueError, match=message) as error:
            reader(path)
        assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="prompt file .* does not exist"):
        read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------- writing files


def test_write_text_atomic_replaces_whole_and_refuses_lone_surrogates(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    assert write_text_atomic(path, "one\n") == path and path.read_text() == "one\n"
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n"
    with pytest.raises(ValueError, match="out.jsonl.*lone surrogate"):
        write_text_atomic(path, "three \ud800\n")
    assert path.read_text() == "two\n" and sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


def test_write_files_atomic_writes_all_or_nothing(tmp_path):
    first, blocked = tmp_path / "first.txt", tmp_path / "blocked"
    (blocked / "inside").mkdir(parents=True)  # a non-empty folder: nothing can be renamed over it
    with pytest.raises(OSError):
        write_files_atomic({first: b"new", blocked: b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]  # the new file is removed again
    first.write_bytes(b"old")
    with pytest.raises(OSError):
        write_files_atomic({first: b"new", blocked: b"x"})
    assert first.read_bytes() == b"old"  # a replaced file gets its old content back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked", "first.txt"]
    assert write_files_atomic({first: b"new", tmp_path / "second.txt": b"2"}) == [first, tmp_path / "second.txt"]
    assert first.read_bytes() == b"new" and (tmp_path / "second.txt").read_bytes() == b"2"
    with pytest.raises(TypeError, match="bytes per path"):
        write_files_atomic({first: "text"})


def test_check_new_files(tmp_path):
    out, summary = tmp_path / "out.jsonl", tmp_path / "out.summary.json"
    check_new_files([out, summary], force=False)  # neither exists
    out.write_text("x")
    with pytest.raises(FileExistsError, match="out.jsonl already exists .*--force"):
        check_new_files([out], force=False)
    check_new_files([out], force=True)
    with pytest.raises(IsADirectoryError, match="is a folder, not a pairs file"):
        check_new_files([tmp_path], force=True, what="pairs file")
    summary.write_text("mine")
    derived = {summary: lambda path: path.read_text() == "earkit's"}
    with pytest.raises(FileExistsError, match="earkit did not write it"):
        check_new_files([out, summary], force=True, derived=derived)
    summary.write_text("earkit's")
    check_new_files([out, summary], force=True, derived=derived)


def test_check_writable_tries_a_real_write(tmp_path):
    check_writable(tmp_path / "not" / "yet" / "there", "output folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "out", "output folder")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PermissionError, match="cannot write in"):
            check_writable(locked / "out", "output folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (["locked"] if os.geteuid() != 0 else [])


# ---------------------------------------------------------------- writing folders


def write_report(value: str):
    def write_into(folder):
        (folder / "report.json").write_text(value)
        (folder / "images").mkdir()
        (folder / "images" / "0.png").write_text(value)
    return write_into


def written(folder) -> str:
    return (folder / "report.json").read_text()


def siblings(folder):
    return sorted(path.name for path in folder.parent.iterdir())


def test_a_folder_is_written_whole_with_its_manifest(tmp_path):
    folder = tmp_path / "report"
    assert write_folder_atomically(folder, write_report("1"), force=False, kind="report", what="report folder") \
        == folder
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest == {"format": earkit_io.MANIFEST_FORMAT, "kind": "report", "files": ["images/0.png", "report.json"]}
    assert siblings(folder) == ["report"]


def test_force_replaces_earkit_output_and_nothing_else(tmp_path):
    folder = tmp_path / "report"
    write_folder_atomically(folder, write_report("1"), force=False, kind="report", what="report folder")
    with pytest.raises(FileExistsError, match="report folder .* already exists and is not empty"):
        write_folder_atomically(folder, write_report("2"), force=False, kind="report", what="report folder")
    with pytest.raises(FileExistsError, match="did not write as a samples folder"):  # another kind's output
        write_folder_atomically(folder, write_report("2"), force=True, kind="samples", what="samples folder")
    write_folder_atomically(folder, write_report("2"), force=True, kind="report", what="report folder")
    assert written(folder) == "2" and siblings(folder) == ["report"]

    (folder / "notes.txt").write_text("precious")  # a user's file among earkit's
    with pytest.raises(FileExistsError, match=r"did not write as a report folder \(notes.txt\)"):
        write_folder_atomically(folder, write_report("3"), force=True, kind="report", what="report folder")
    assert (folder / "notes.txt").read_text() == "precious" and written(folder) == "2"

    old = tmp_path / "old"  # written before manifests: legacy() vouches for the names it may hold
    old.mkdir()
    (old / "report.json").write_text("0")
    with pytest.raises(FileExistsError, match="report.json"):
        check_replaceable(old, force=True, kind="report", what="report folder")
    check_replaceable(old, force=True, kind="report", what="report folder", legacy=lambda _: {"report.json"})
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", force=False, kind="report", what="report folder")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        check_replaceable(tmp_path / "old" / "report.json", force=True, kind="report", what="report folder")


def test_a_failed_write_keeps_the_previous_folder(tmp_path):
    folder = tmp_path / "report"
    write_folder_atomically(folder, write_report("1"), force=False, kind="report", what="report folder")

    def fail(partial):
        write_report("2")(partial)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_folder_atomically(folder, fail, force=True, kind="report", what="report folder")
    assert written(folder) == "1" and siblings(folder) == ["report"]


# A separate process that dies (os._exit: no cleanup, no finally blocks) in the middle of a
# replacing write: while writing into the partial folder, or between renaming the old folder away
# and renaming the new one into place.
KILLED_WRITE = textwrap.dedent("""
    import os, sys
    from earkit.io import write_folder_atomically

    folder, moment = sys.argv[1], sys.argv[2]
    def write_into(partial):
        (partial / "report.json").write_text("2")
        if moment == "while-writing":
            os._exit(9)
    if moment == "between-renames":
        real_rename = os.rename
        def dying_rename(source, target):
            if ".partial-" in os.fspath(source):  # the old folder has just been renamed away
                os._exit(9)
            real_rename(source, target)
        os.rename = dying_rename
    write_folder_atomically(folder, write_into, force=True, kind="report", what="report folder")
    sys.exit("the write was supposed to die")
""")


@pytest.mark.parametrize("moment", ["while-writing", "between-renames"])
def test_a_killed_write_leaves_the_previous_folder_recoverable(tmp_path, moment):
    folder = tmp_path / "report"
    write_folder_atomically(folder, write_report("1"), force=False, kind="report", what="report folder")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(folder), moment], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr
    left = siblings(folder)
    # What a kill leaves, by design: the new folder's partial copy, and between the renames the
    # previous folder under <name>.old-*, with <name> itself briefly absent.
    assert any(name.startswith("report.partial-") for name in left)
    if moment == "between-renames":
        assert "report" not in left and any(name.startswith("report.old-") for name in left)
    assert recover_interrupted_save(folder) == (moment == "between-renames")
    assert written(folder) == "1"
    write_folder_atomically(folder, write_report("3"), force=True, kind="report", what="report folder")
    assert written(folder) == "3" and siblings(folder) == ["report"]  # the next write removes the leftovers
