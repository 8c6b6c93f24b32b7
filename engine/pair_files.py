"""Prompt pairs: a prompt that shows the concept to erase, and its anchor (replacement) prompt.

The trainer samples images under the concept prompt and teaches the model to draw them as it
would under the anchor prompt (DESIGN.md, "The method"). Pairs come from a concept and an anchor
put into templates, or from a file: earkit's own JSON lines, or the files released with the EAR
paper (shared/ear-data), whose key names are read as they are:

    pairs.jsonl          {"concept_prompt": ..., "anchor_prompt": ..., "concept": ..., "anchor": ...} per line
    train_church.json    [{original_prompt, modified_prompt, concept, replaced}, ...]
    train_nudity.json    [{unsafe_prompt, safe_prompt, concept, category}, ...]
    train_van_gogh.csv   unsafe_prompt,safe_prompt

Every error names the file and the line (for a JSON list, the entry and the line it starts on).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from earkit.io import parse_json, read_text_file, unencodable, write_text_atomic

# Key names per field, earkit's first, then the EAR files' (the same names in JSONL, JSON and CSV).
# train_nudity.json's "category" ("sexual", ...) is not an anchor, so it is not read.
CONCEPT_PROMPT_KEYS = ("concept_prompt", "original_prompt", "unsafe_prompt")
ANCHOR_PROMPT_KEYS = ("anchor_prompt", "modified_prompt", "safe_prompt")
CONCEPT_KEYS = ("concept",)
ANCHOR_KEYS = ("anchor", "replaced")

# The prompts pairs_from_concept writes when no templates are given: plain English phrasings for
# a general text-to-image model such as Janus-Pro. A model of a small vocabulary (a word-level
# tokenizer) is given templates in its own words (a pairs file, or `templates=`; ShapesWorld's
# default erasure builds its pairs from its own templates).
DEFAULT_TEMPLATES = (
    "{}",
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a painting of a {}",
    "a close-up photo of the {}",
    "a detailed drawing of a {}",
)


@dataclass(frozen=True)
class PromptPair:
    concept_prompt: str  # shows the concept to erase
    anchor_prompt: str  # what the model should draw instead
    concept: str | None = None
    anchor: str | None = None


def same_text(a: str, b: str) -> bool:
    """Equal up to case and whitespace: such a pair teaches nothing."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def deduplicate(pairs: list[PromptPair]) -> list[PromptPair]:
    """Drop exact repeats, keeping the first of each, in order."""
    return list(dict.fromkeys(pairs))


def pairs_from_concept(concept: str, anchor: str, templates: list[str] | None = None) -> list[PromptPair]:
    """One pair per template: the template with the concept, and with the anchor, in place of "{}"."""
    for name, value in (("concept", concept), ("anchor", anchor)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty word or phrase, got {value!r}")
    concept, anchor = concept.strip(), anchor.strip()
    if same_text(concept, anchor):
        raise ValueError(f"concept and anchor are the same ({concept!r} and {anchor!r}): the anchor must be "
                         "what the model draws instead of the concept")
    if isinstance(templates, str):
        raise ValueError(f"templates must be a list of strings, got the single string {templates!r}")
    templates = DEFAULT_TEMPLATES if templates is None else list(templates)
    if not templates:
        raise ValueError("templates is empty")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' where the concept goes")
    pairs = [PromptPair(template.replace("{}", concept).strip(), template.replace("{}", anchor).strip(),
                        concept, anchor) for template in templates]
    return deduplicate(pairs)


# ---------------------------------------------------------------- reading files


def pick_text(record: dict, keys: tuple[str, ...], where: str) -> str | None:
    """The stripped value of the first of `keys` in the record; None when absent, null or blank."""
    for key in keys:
        if key in record and record[key] is not None:
            value = record[key]
            if not isinstance(value, str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r}")
            bad = unencodable(value)
            if bad is not None:
                raise ValueError(f"{where}: {key!r} is not valid Unicode text: it holds the lone surrogate "
                                 f"{ascii(bad)} (a JSON escape such as \\ud800 without its pair)")
            return value.strip() or None
    return None


def pair_from_record(record, where: str) -> PromptPair:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with a concept prompt and an anchor prompt, got "
                         f"{type(record).__name__}")
    concept_prompt = pick_text(record, CONCEPT_PROMPT_KEYS, where)
    anchor_prompt = pick_text(record, ANCHOR_PROMPT_KEYS, where)
    if concept_prompt is None and anchor_prompt is None and "prompt" in record:
        raise ValueError(f"{where}: has no anchor prompts, only a single 'prompt': this is an evaluation prompt "
                         f"file (like the EAR test_*.json/csv), not concept/anchor pairs for training")
    if concept_prompt is None:
        raise ValueError(f"{where}: missing the concept prompt (one of {', '.join(CONCEPT_PROMPT_KEYS)})")
    if anchor_prompt is None:
        raise ValueError(f"{where}: missing the anchor prompt (one of {', '.join(ANCHOR_PROMPT_KEYS)})")
    if same_text(concept_prompt, anchor_prompt):
        raise ValueError(f"{where}: the concept prompt and the anchor prompt are the same ({concept_prompt!r}); "
                         "a pair must differ")
    return PromptPair(concept_prompt, anchor_prompt, pick_text(record, CONCEPT_KEYS, where),
                      pick_text(record, ANCHOR_KEYS, where))


def jsonl_records(path: Path, text: str):
    """(where, record) per non-blank line."""
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        try:
            record = parse_json(line, f"{path} line {number}")
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: malformed JSON ({error.msg}, column {error.colno})") from None
        yield f"{path} line {number}", record


def json_entry_lines(text: str, source: str = "JSON text"):
    """The line each entry of a valid top-level JSON list starts on."""
    position = text.index("[") + 1
    line = 1 + text.count("\n", 0, position)
    while True:
        while text[position] in " \t\r\n,":
            line += text[position] == "\n"
            position += 1
        if text[position] == "]":
            return
        yield line
        _, end = parse_json(text, f"{source} line {line}", start=position)
        line += text.count("\n", position, end)
        position = end


def json_list_records(path: Path, text: str):
    """(where, record) per entry of a JSON list, as the EAR train_*.json files are."""
    try:
        document = parse_json(text, str(path))
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("{") and error.msg == "Extra data":  # one object per line in a .json file
            yield from jsonl_records(path, text)
            return
        raise ValueError(f"{path} line {error.lineno}: malformed JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(document, list):
        raise ValueError(f"{path} line 1: the top level is a {type(document).__name__}, expected a list of pair "
                         "objects (or one object per line, as .jsonl)")
    for index, (line, record) in enumerate(zip(json_entry_lines(text, str(path)), document), 1):
        yield f"{path} entry {index} (line {line})", record


def has_column(header: list[str], keys: tuple[str, ...]) -> bool:
    return any(key in header for key in keys)


def csv_records(path: Path, text: str, columns: tuple[tuple[tuple[str, ...], str], ...] | None = None):
    """(where, record) per row of a CSV file with a header, as train_van_gogh.csv is. The header
    must have one of each group of `columns` (default: a concept prompt and an anchor prompt)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        if columns is None and not has_column(header, CONCEPT_PROMPT_KEYS + ANCHOR_PROMPT_KEYS) and "prompt" in header:
            raise ValueError(f"{path} line 1: has no anchor prompts, only a 'prompt' column ({','.join(header)}): "
                             "this is an evaluation prompt file, not concept/anchor pairs for training")
        columns = columns or ((CONCEPT_PROMPT_KEYS, "concept prompt"), (ANCHOR_PROMPT_KEYS, "anchor prompt"))
        for keys, what in columns:
            if not has_column(header, keys):
                raise ValueError(f"{path} line 1: the header ({','.join(header)}) has no {what} column "
                                 f"(one of {', '.join(keys)})")
        last_line = reader.line_num
        for row in reader:
            first_line, last_line = last_line + 1, reader.line_num  # a quoted field may span lines
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise ValueError(f"{path} line {first_line}: {len(row)} fields, the header has {len(header)} "
                                 "(an unquoted comma?)")
            yield f"{path} line {first_line}", dict(zip(header, row))
    except csv.Error as error:
        raise ValueError(f"{path} line {reader.line_num}: malformed CSV ({error})") from None


def file_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".json", ".csv"):
        return suffix[1:]
    first = text.lstrip()[:1]
    if first in ("[", "{"):
        return "json" if first == "[" else "jsonl"
    raise ValueError(f"{path}: unknown prompt pair file format (expected .jsonl, .json or .csv)")


def load_pairs(path: str | os.PathLike) -> list[PromptPair]:
    """Read prompt pairs from a .jsonl, .json or .csv file (see the module docstring), stripped and
    without exact repeats. ValueError naming the file and line for anything wrong in it."""
    path = Path(path).expanduser()
    text = read_text_file(path, "prompt pair file")
    records = {"jsonl": jsonl_records, "json": json_list_records, "csv": csv_records}[file_format(path, text)]
    pairs = [pair_from_record(record, where) for where, record in records(path, text)]
    if not pairs:
        raise ValueError(f"{path} holds no prompt pairs")
    return deduplicate(pairs)


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts whose images an erasure must keep (the trainer's `preserve`): a text file of one
    prompt per line, or records with a "prompt" (like the EAR test files), or prompt pairs, whose
    anchor prompts are read (they name what the concept is replaced by, which must stay drawable).
    Stripped and without exact repeats; ValueError naming the file and line for anything wrong."""
    path = Path(path).expanduser()
    text = read_text_file(path, "prompt file")
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        kind = file_format(path, text)
        if kind == "csv":
            records = csv_records(path, text, columns=((("prompt",) + ANCHOR_PROMPT_KEYS, "prompt"),))
        else:
            records = (jsonl_records if kind == "jsonl" else json_list_records)(path, text)
        prompts = []
        for where, record in records:
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected an object with a prompt, got {type(record).__name__}")
            prompt = pick_text(record, ("prompt",), where) or pick_text(record, ANCHOR_PROMPT_KEYS, where)
            if prompt is None:
                raise ValueError(f"{where}: no prompt (a 'prompt', or an anchor prompt: one of "
                                 f"{', '.join(ANCHOR_PROMPT_KEYS)})")
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return list(dict.fromkeys(prompts))


# ---------------------------------------------------------------- writing


def write_pairs_jsonl(pairs: list[PromptPair], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write pairs as JSON lines that load_pairs reads back equal. Atomic: a temporary file beside
    `path`, flushed to disk, then renamed over it; an existing file is replaced only with force."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to write")
    lines = []
    for index, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise ValueError(f"pairs[{index}] is a {type(pair).__name__}, not a PromptPair")
        if not pair.concept_prompt.strip() or not pair.anchor_prompt.strip():
            raise ValueError(f"pairs[{index}] has an empty prompt: {pair}")
        if same_text(pair.concept_prompt, pair.anchor_prompt):
            raise ValueError(f"pairs[{index}]: the concept prompt and the anchor prompt are the same: {pair}")
        record = {"concept_prompt": pair.concept_prompt.strip(), "anchor_prompt": pair.anchor_prompt.strip()}
        record.update({key: value for key, value in (("concept", pair.concept), ("anchor", pair.anchor)) if value})
        lines.append(json.dumps(record, ensure_ascii=False))

    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a pairs file")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists (pass force=True to replace it)")
    return write_text_atomic(path, "\n".join(lines) + "\n")


