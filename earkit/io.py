"""earkit's file I/O, written once: what every command reads from outside and how it writes.

Reading: `parse_json` for any JSON from outside (a file, a server, an LLM's reply), which turns
every way such JSON fails into a ValueError naming its source; `read_text_file` for prompt and
pairs files (UTF-8, a byte-order mark dropped, a folder or an empty file refused by name);
`read_prompt_records` and `read_prompts`, the one reader of prompt files (.txt, .json, .jsonl,
.csv) for every command, with the record readers that engine/pair_files.py shares for pairs files.

Writing: nothing is ever half-written. `write_files_atomic` writes one or several files as one
(temporary files beside them, fsynced, renamed into place together); `write_folder_atomically`
writes a whole output folder the same way. Every folder earkit writes gets a manifest
(`.earkit-files.json`) of what it wrote there, and `check_replaceable` (what --force may replace)
refuses a folder holding anything else, naming the file: --force replaces earkit's own output and
never a user's files. `check_writable` tries a real write before minutes of work.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


# ---------------------------------------------------------------- reading


class UnreadableJSON(ValueError):
    """Well-formed JSON from outside (a file, a server, an LLM's reply) that the parser cannot hold."""


class NestedTooDeeply(UnreadableJSON):
    """JSON nested deeper than the parser can follow."""


def parse_json(text: str, source: str, *, start: int | None = None):
    """json.loads(text) for text from outside; with `start`, the (value, end) of the JSON value
    that starts at text[start] (JSONDecoder.raw_decode). Every way outside JSON fails is a
    ValueError naming `source` (a file and line, a URL):

      malformed                        json.JSONDecodeError, as ever, for the caller to word
      "[" * 100000                     NestedTooDeeply: json recurses once per bracket, and the
                                       RecursionError would end a command with a traceback
      a number of 5000 digits          UnreadableJSON: Python converts at most 4300 digits, and its
                                       plain ValueError would pass a `except JSONDecodeError`
    """
    try:
        return json.loads(text) if start is None else _DECODER.raw_decode(text, start)
    except RecursionError:
        raise NestedTooDeeply(f"{source}: JSON nested too deeply to read") from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        raise UnreadableJSON(f"{source}: a JSON number too long to read (more digits than Python converts)") \
            from None


_DECODER = json.JSONDecoder()

def unencodable(text: str) -> str | None:
    """The first character of `text` that UTF-8 cannot encode (a lone surrogate, which the JSON
    escape "\\ud800" decodes to), or None. Such text breaks every file written from it and every
    tokenizer, so readers refuse it where it comes in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return text[error.start]
    return None


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of a prompt file; FileNotFoundError or ValueError naming `what` and the path."""
    if path.is_dir():
        raise FileNotFoundError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first key
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


# ---------------------------------------------------------------- prompt and pairs files

# Key names per field, earkit's first, then the EAR files' (the same names in JSONL, JSON and CSV).
CONCEPT_PROMPT_KEYS = ("concept_prompt", "original_prompt", "unsafe_prompt")
ANCHOR_PROMPT_KEYS = ("anchor_prompt", "modified_prompt", "safe_prompt")
# A prompt file's prompt: its "prompt", else (a pairs file) its anchor prompt, which names what a
# concept is replaced by and so must stay drawable.
PROMPT_KEYS = ("prompt",) + ANCHOR_PROMPT_KEYS


def pick_text(record: dict, keys: tuple[str, ...], where: str) -> str | None:
    """The stripped value of the first of `keys` in the record; None when absent, null or blank.
    ValueError naming `where` for a value that is not a string or not valid Unicode."""
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


def file_format(path: Path, text: str) -> str | None:
    """The format of a pairs or prompt file, "jsonl", "json" or "csv": by the suffix (.jsonl, .ndjson, .json, .csv), else by the content
    (a JSON list, or one object per line); None for anything else."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".json", ".csv"):
        return suffix[1:]
    return {"[": "json", "{": "jsonl"}.get(text.lstrip()[:1])


def jsonl_records(path: Path, text: str):
    """(where, value) per non-blank line of JSON lines."""
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
    """(where, value) per entry of a JSON list, as the EAR train_*.json and test_*.json files are;
    a .json file of one object per line is read as JSON lines."""
    try:
        document = parse_json(text, str(path))
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("{") and error.msg == "Extra data":  # one object per line in a .json file
            yield from jsonl_records(path, text)
            return
        raise ValueError(f"{path} line {error.lineno}: malformed JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(document, list):
        raise ValueError(f"{path} line 1: the top level is a {type(document).__name__}, expected a list of "
                         "objects (or one object per line, as .jsonl)")
    for index, (line, record) in enumerate(zip(json_entry_lines(text, str(path)), document), 1):
        yield f"{path} entry {index} (line {line})", record


def has_column(header: list[str], keys: tuple[str, ...]) -> bool:
    return any(key in header for key in keys)


def csv_header(text: str) -> list[str]:
    """The stripped names of a CSV text's first row ([] when it cannot be read: csv_records says why)."""
    try:
        return [name.strip() for name in next(csv.reader(io.StringIO(text, newline="")), [])]
    except csv.Error:
        return []


def csv_records(path: Path, text: str, columns: tuple[tuple[tuple[str, ...], str], ...]):
    """(where, {column: cell}) per non-blank row of a CSV file with a header, as the EAR .csv files
    are. The header must have one of each group of `columns`, ((keys, what), ...); a row with more
    fields than the header (an unquoted comma) is refused rather than cut short."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
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


def read_prompt_records(path: str | os.PathLike, what: str = "prompt file") -> list[tuple[str, dict]]:
    """(where, record) per prompt of a prompt file, `where` naming the file and line. One set of
    rules for every command that reads prompts (sample --prompts-file, erase --preserve, eval
    --benchmark and --preserve):

      .txt              one prompt per non-blank line
      .csv              a header with a prompt column (one of PROMPT_KEYS), one row per prompt
      a JSON list       of prompts (strings) or of objects with a prompt (.json, or any file that
                        starts with "[")
      JSON lines        one prompt or object per line (.jsonl, .ndjson, or any file that starts with "{")
      anything else     one prompt per non-blank line

    An object's prompt is its "prompt", else its anchor prompt (ANCHOR_PROMPT_KEYS: a pairs file's
    prompts that must stay drawable). Each record is the object with "prompt" set to that prompt,
    stripped; a string or a line is {"prompt": it}. Repeats are kept (the caller decides).
    FileNotFoundError or ValueError naming the file (and line) for anything wrong in it."""
    path = Path(path).expanduser()
    text = read_text_file(path, what)
    kind = None if path.suffix.lower() == ".txt" else file_format(path, text)
    if kind == "csv":
        entries = csv_records(path, text, ((PROMPT_KEYS, "prompt"),))
    elif kind is not None and text.lstrip().startswith(("[", "{")):
        entries = (json_list_records if text.lstrip()[0] == "[" else jsonl_records)(path, text)
    elif kind is not None:
        entries = (json_list_records if kind == "json" else jsonl_records)(path, text)
    else:
        entries = [(f"{path} line {number}", line) for number, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    records = []
    for where, entry in entries:
        if isinstance(entry, str):
            entry = {"prompt": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a prompt or an object with a prompt, got {type(entry).__name__}")
        prompt = pick_text(entry, ("prompt",), where) or pick_text(entry, ANCHOR_PROMPT_KEYS, where)
        if prompt is None:
            raise ValueError(f"{where}: no prompt (a 'prompt', or an anchor prompt: one of "
                             f"{', '.join(ANCHOR_PROMPT_KEYS)})")
        records.append((where, {**entry, "prompt": prompt}))
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


def read_prompts(path: str | os.PathLike, what: str = "prompt file") -> list[str]:
    """The prompts of a prompt file (read_prompt_records), stripped, in order, repeats kept."""
    return [record["prompt"] for _, record in read_prompt_records(path, what)]


# ---------------------------------------------------------------- writing files


def json_digest(value) -> str:
    """16 hex digits of sha256 over a JSON value's text (any string, lone surrogates too): what a
    record keeps of a list of prompts to tell, later, whether it is the same list."""
    import hashlib

    text = json.dumps(value, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def encode_utf8(text: str, path) -> bytes:
    """The UTF-8 bytes of a file's text; ValueError naming the file for a lone surrogate."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"cannot write {path}: its text holds the lone surrogate {ascii(text[error.start])}, "
                         "which is not valid Unicode (nothing written)") from None


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text to a temporary file beside `path`, flush it to disk, then rename it over `path`:
    a crash leaves the old file or the new one, never half of one. ValueError naming the file when
    the text is not encodable as UTF-8 (a lone surrogate), before anything is written."""
    return write_files_atomic({path: encode_utf8(text, path)})[0]


def write_files_atomic(files: dict) -> list[Path]:
    """Write several files as one, {path: bytes}: the outputs of one command (pairs and their
    summary, kept pairs and their decisions) are there together or not at all, so a summary never
    describes a file that was not written and a rerun is never refused over half an output.

    Each file goes to a temporary file beside it, flushed to disk; only when every one is written
    are they renamed into place. If a rename fails, those already renamed are undone: a new file is
    removed, a replaced one gets its old content back (kept under a second name, a hard link, until
    all are in place; on a filesystem without hard links a replaced file cannot be put back).
    Serialize everything to bytes before calling: then nothing that can fail on the data runs
    after the first byte is written."""
    files = {Path(path): data for path, data in files.items()}
    for path, data in files.items():
        if not isinstance(data, bytes):
            raise TypeError(f"write_files_atomic takes bytes per path, got {type(data).__name__} for {path}")
    stamp = f"{os.getpid()}-{time.time_ns()}"
    staged, placed, backups = [], [], []  # (temporary, path); (path, existed, backup); backup paths
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.partial-{stamp}")
            staged.append((temporary, path))
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        try:
            for temporary, path in staged:
                existed, backup = path.exists(), None
                if existed and path.is_file():
                    backup = path.with_name(f".{path.name}.previous-{stamp}")
                    try:
                        os.link(path, backup)
                        backups.append(backup)
                    except OSError:
                        backup = None
                placed.append((path, existed, backup))
                os.replace(temporary, path)
        except BaseException:
            for path, existed, backup in reversed(placed):
                try:
                    if backup is not None:
                        os.replace(backup, path)
                    elif not existed:
                        path.unlink(missing_ok=True)
                except OSError:
                    pass  # the error being raised says more than this one
            raise
    finally:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        for backup in backups:
            backup.unlink(missing_ok=True)
    if os.name != "nt":  # flush the renames themselves (Windows cannot open a folder to flush it)
        for folder in dict.fromkeys(path.parent for path in files):
            descriptor = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    return list(files)


def check_new_files(paths, *, force: bool, what: str = "file", derived: dict | None = None) -> None:
    """Refuse, before any work, to write over files unless --force (force=True) says so.

    `paths`: the files a command will write. A folder where a file should go is refused always, an
    existing file unless `force`. `derived` maps a path the user never typed (a summary or decisions
    file written beside --out) to a test `is_ours(path) -> bool`: under --force such a file is
    replaced only when earkit wrote it, so --force never deletes a user's file by accident.
    """
    derived = derived or {}
    for path in map(Path, paths):
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, not a {what}")
        if not path.exists():
            continue
        if not force:
            raise FileExistsError(f"{path} already exists (pass --force, or force=True, to replace it)")
        is_ours = derived.get(path)
        if is_ours is not None and not is_ours(path):
            raise FileExistsError(f"not replacing {path}: earkit did not write it (it writes a file of that name "
                                  "beside its output); move it or choose another --out")


# ---------------------------------------------------------------- writing folders


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk. Windows cannot open a folder to flush it."""
    if path.is_dir() and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file under a folder, then the folders themselves, deepest first."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def temporary_sibling(folder: Path, kind: str) -> Path:
    return folder.with_name(f"{folder.name}.{kind}-{os.getpid()}-{time.time_ns()}")


def temporary_siblings(folder: Path, kind: str) -> list[Path]:
    """The `<name>.<kind>-<pid>-<ns>` siblings of a folder, oldest first."""
    prefix = f"{folder.name}.{kind}-"
    found = []
    if folder.parent.is_dir():
        for path in folder.parent.iterdir():
            pid, _, nanoseconds = path.name[len(prefix):].partition("-")
            if path.name.startswith(prefix) and pid.isdigit() and nanoseconds.isdigit():
                found.append((int(nanoseconds), path))
    return [path for _, path in sorted(found)]


def recover_interrupted_save(folder: str | os.PathLike) -> bool:
    """Undo a replacing save killed between its two renames.

    Then `folder` is missing and its complete previous version sits at `<name>.old-*`: rename that
    back. Returns True when it did. save_checkpoint, load_checkpoint and export_model call it.
    """
    folder = Path(folder).expanduser().absolute()
    if folder.exists():
        return False
    previous = temporary_siblings(folder, "old")
    if not previous:
        return False
    os.rename(previous[-1], folder)
    fsync_path(folder.parent)
    return True


def remove_leftovers(folder: Path) -> None:
    """Delete what killed saves of `folder` left behind: partial folders, and old ones once `folder` exists."""
    leftovers = temporary_siblings(folder, "partial")
    if folder.exists():
        leftovers += temporary_siblings(folder, "old")
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)


MANIFEST_FILE = ".earkit-files.json"

MANIFEST_FORMAT = "earkit-written-files"

def files_under(folder: Path) -> list[str]:
    """Every file and link under `folder`, as sorted POSIX paths relative to it (folders themselves
    are not listed: an empty subfolder is not data)."""
    found = []
    for root, folders, files in os.walk(folder):
        for name in files + [f for f in folders if (Path(root) / f).is_symlink()]:
            found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def write_manifest(folder: Path, kind: str, files: list[str] | None = None) -> None:
    """Record every file earkit wrote into `folder` (all there is, or `files` where others may
    have put files of their own beside them), so that a later --force can tell them from files
    somebody else put there (which it must never delete)."""
    if files is None:
        files = [name for name in files_under(folder) if name != MANIFEST_FILE]
    files = sorted(files)
    record = {"format": MANIFEST_FORMAT, "kind": kind, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def manifest_files(folder: Path, kind: str) -> set[str] | None:
    """The files the manifest of `folder` says earkit wrote there as a `kind`, or None without a
    readable manifest of that kind."""
    try:
        record = parse_json((folder / MANIFEST_FILE).read_text(encoding="utf-8"), MANIFEST_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT or record.get("kind") != kind:
        return None
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files) | {MANIFEST_FILE}


def some_of(names: list[str], shown: int = 3) -> str:
    """The first few of a list of names, and how many more: for one-line errors."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def foreign_files(folder: Path, kind: str, legacy=None) -> list[str]:
    """What in an existing `folder` earkit did not write as a `kind`: [] when the whole folder is
    earkit's (empty, or every file listed in its manifest), else the files that are not, sorted
    (all of them when the folder has no manifest and legacy does not vouch for it either).

    legacy(folder) -> set of names or None: the top-level names a folder written before manifests
    existed may hold, when the folder is recognisably one (None when it is not).
    """
    present = files_under(folder)
    if not present:
        return []
    owned = manifest_files(folder, kind)
    if owned is None and legacy is not None:
        names = legacy(folder)
        if names is not None:
            return [name for name in present if name.split("/", 1)[0] not in names]
    if owned is None:
        return present
    return [name for name in present if name not in owned]


def check_replaceable(folder: str | os.PathLike, *, force: bool, kind: str, what: str, legacy=None) -> None:
    """Refuse (FileExistsError naming the problem) to replace an existing `folder` unless force is
    set and everything in it is what earkit wrote there as a `kind`: --force replaces earkit's own
    output, never a file somebody else put there. Called before any work, and again when writing."""
    folder = Path(folder).expanduser()
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise FileExistsError(f"{what} path {folder} exists and is not a folder; not replacing it")
    if not any(folder.iterdir()):
        return
    if not force:
        raise FileExistsError(f"{what} {folder} already exists and is not empty (pass --force to replace it)")
    foreign = foreign_files(folder, kind, legacy)
    if foreign:
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise FileExistsError(f"not replacing {folder}: it holds files earkit did not write as {article} {what} "
                              f"({some_of(foreign)}); move them out or choose another folder")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """PermissionError naming `path` when nothing could be written there: tried for real (a
    temporary file in the nearest existing folder), since a permission check says yes to root on a
    read-only file system. Called before long work, whose output would otherwise be lost at the end."""
    path = Path(path).expanduser().absolute()
    existing = path if path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a folder")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".earkit-write-probe-", dir=existing)
    except OSError as error:
        raise PermissionError(f"{what} {path}: cannot write in {existing} ({error.strerror or error})") from None
    os.close(descriptor)
    os.unlink(probe)


def write_folder_atomically(folder: str | os.PathLike, write_into, *, force: bool, kind: str, what: str,
                            legacy=None) -> Path:
    """Create `folder` with write_into(temporary_folder), so that it appears complete or not at all.

    An existing `folder` is replaced only with force, and only when everything in it is earkit's
    own `kind` of output (check_replaceable): force must never delete a file earkit did not write.
    The files written are recorded in the folder's manifest (MANIFEST_FILE) for the next check.
    """
    folder = Path(folder).expanduser().absolute()
    if not folder.name:
        raise ValueError(f"{what} path {folder} has no folder name")
    recover_interrupted_save(folder)
    check_replaceable(folder, force=force, kind=kind, what=what, legacy=legacy)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)

    partial = temporary_sibling(folder, "partial")
    partial.mkdir()
    try:
        write_into(partial)
        write_manifest(partial, kind)
        partial.chmod(0o755)  # a shared or shipped folder must be readable by others
        fsync_tree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    if not folder.exists():
        try:
            os.rename(partial, folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        fsync_path(folder.parent)
        return folder

    old = temporary_sibling(folder, "old")
    os.rename(folder, old)
    try:
        os.rename(partial, folder)
    except BaseException:
        os.rename(old, folder)  # put the previous version back before reporting the failure
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_path(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder
