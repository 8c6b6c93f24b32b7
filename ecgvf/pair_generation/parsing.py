"""Reading what an LLM answered: the list of pair objects in a reply (prose, code fences, trailing
commas and cut-off lists tolerated), each pair checked (check_pair) and the reply's pairs
validated and deduplicated (validate_items), every rejection with its reason.

A reply may name its fields as the request template asks (original_prompt, modified_prompt,
replaced: EAR's names, which LLMs have seen) or with earkit's own (concept_prompt, anchor_prompt,
anchor); a checked pair is always {concept_prompt, anchor_prompt, anchor, similarity}.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re

from earkit.engine.tiny import WORD as TOKEN, words_of
from earkit.io import UnreadableJSON, parse_json, unencodable

# Rejection reasons, in the order the checks run (the summary counts each).
NOT_AN_OBJECT = "not an object"
MISSING_FIELD = "missing field"
INVALID_TEXT = "not valid Unicode text"  # a lone surrogate ("\ud800" in the JSON): no file or tokenizer takes it
IDENTICAL = "identical"
CONCEPT_MISSING = "concept missing from the concept prompt"
CONCEPT_IN_ANCHOR_PROMPT = "concept in the anchor prompt"
ANCHOR_MISSING = "anchor missing from the anchor prompt"
REWRITTEN = "sentence rewritten"
DUPLICATE = "duplicate"
REJECTION_REASONS = (NOT_AN_OBJECT, MISSING_FIELD, INVALID_TEXT, IDENTICAL, CONCEPT_MISSING, CONCEPT_IN_ANCHOR_PROMPT,
                     ANCHOR_MISSING, REWRITTEN, DUPLICATE)

# Field names a reply may use: the template asks for EAR's (first), earkit's own are accepted too.
CONCEPT_PROMPT_KEYS = ("original_prompt", "concept_prompt")
ANCHOR_PROMPT_KEYS = ("modified_prompt", "anchor_prompt")
ANCHOR_KEYS = ("replaced", "anchor", "replacement")

DEFAULT_MIN_SIMILARITY = 0.75


class MalformedReply(ValueError):
    """A reply holds no JSON list of pairs."""


def short_text(text: str, limit: int = 200) -> str:
    """Text for the summary and messages: one line, at most `limit` characters, and writable (a lone
    surrogate, which a reply's JSON escape can hold, becomes the escape text \\udXXX again)."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def field(item: dict, keys: tuple[str, ...]):
    """The first of `keys` that `item` has, or None."""
    for key in keys:
        if key in item:
            return item[key]
    return None


# ---------------------------------------------------------------- the list of pairs in a reply


CLOSING_BRACKET_AHEAD = re.compile(r"\s*[\]}]")


def without_trailing_commas(text: str) -> str:
    """The text with each comma that only precedes a closing bracket removed, outside strings
    (the one JSON slip that is safe to repair)."""
    kept, in_string, escaped = [], False, False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "," and CLOSING_BRACKET_AHEAD.match(text, index + 1):
            continue
        kept.append(char)
    return "".join(kept)


def _as_pair_list(value, *, single: bool = False):
    """The list of pair objects a decoded JSON value holds, or None: a list holding at least one
    object, or {"pairs": [...]} (an object with one list of objects as a value); with `single`,
    also one bare pair object."""
    if isinstance(value, list):
        return value if any(isinstance(item, dict) for item in value) else None
    if isinstance(value, dict):
        if single and any(key in value for key in CONCEPT_PROMPT_KEYS):
            return [value]
        lists = [item for item in value.values() if isinstance(item, list) and any(isinstance(x, dict) for x in item)]
        return lists[0] if len(lists) == 1 else None
    return None


def _salvage_items(text: str, start: int, opening: str | None) -> list:
    """The complete values at the head of a list cut off mid-way (a reply that ran out of tokens),
    each starting with `opening` (None: any value)."""
    items, position = [], start + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or (opening is not None and text[position] != opening):
            return items
        try:
            value, position = parse_json(text, "the reply", start=position)
        except ValueError:  # malformed, or nested too deeply
            return items
        items.append(value)


def extract_json_list(reply, *, as_list, salvage_opening: str | None, what: str) -> tuple[list, bool]:
    """(the list an LLM reply holds, whether it was salvaged from a cut-off list): the search that
    extract_pair_list and the paraphrases' extract_prompt_list share. as_list(value, single=False)
    is the list a decoded JSON value holds, or None (single=True: also one bare item); a salvaged
    list keeps the values that start with salvage_opening (None: any).

    Tolerated: code fences, prose before or after, trailing commas, a {"NAME": [...]} wrapper, a
    list cut off after complete items, one bare item. MalformedReply when no such list is there
    (an empty list included: it gives nothing, and is retried like any other useless reply). A
    reply whose JSON is nested too deeply to read ("[" * 100000), or with a number too long to
    read, is malformed too, said so."""
    if not isinstance(reply, str) or not reply.strip():
        raise MalformedReply("empty reply")
    unreadable = []  # why a decode failed other than malformed JSON, for the message when nothing is found
    fenced = re.findall(r"```[A-Za-z]*\s*\n?(.*?)```", reply, flags=re.DOTALL)
    texts = fenced + [reply]

    def decoded_from(text: str, opening: str):
        """Each JSON value that starts at an `opening` bracket, as written and with trailing commas
        removed (lazily: the first good one usually ends the search)."""
        for source in (text, without_trailing_commas(text)):
            for match in itertools.islice(re.finditer(re.escape(opening), source), 200):
                try:
                    yield parse_json(source, "the reply", start=match.start())[0]
                except json.JSONDecodeError:
                    continue
                except UnreadableJSON as error:
                    unreadable.append(str(error).removeprefix("the reply: "))
                    continue

    # In order of trust: a whole list (or a wrapper around one), the complete items of a list cut
    # off mid-way, a single bare item.
    for text in texts:
        for value in itertools.chain(decoded_from(text, "["), decoded_from(text, "{")):
            found = as_list(value)
            if found is not None:
                return found, False
    for text in texts:
        start = text.find("[")
        items = _salvage_items(text, start, salvage_opening) if start >= 0 else []
        if items and as_list(items) is not None:
            return items, True
    for text in texts:
        for value in decoded_from(text, "{"):
            found = as_list(value, single=True)
            if found is not None:
                return found, False
    if unreadable:
        raise MalformedReply(unreadable[0])
    if re.search(r"\[\s*\]", reply):
        raise MalformedReply("an empty list")
    raise MalformedReply(f"no JSON list of {what} in the reply")


def extract_pair_list(reply) -> tuple[list, bool]:
    """(the list of pair objects in an LLM reply, whether it was salvaged from a cut-off list):
    extract_json_list for pairs, each an object."""
    return extract_json_list(reply, as_list=_as_pair_list, salvage_opening="{", what="pairs")


# ---------------------------------------------------------------- checking pairs

def concept_pattern(concept: str) -> re.Pattern:
    """The concept as whole words, any case, any whitespace between its words, plural tolerated
    (circle/circles, church/churches, city/cities); a possessive ("church's") matches too."""
    words = concept.split()
    last = words[-1]
    forms = [re.escape(last) + "(?:s|es)?"]
    if len(last) > 1 and last[-1].lower() == "y":
        forms.append(re.escape(last[:-1]) + "ies")
    head = "".join(re.escape(word) + r"\s+" for word in words[:-1])
    return re.compile(r"(?<!\w)" + head + "(?:" + "|".join(forms) + r")(?!\w)", re.IGNORECASE)


def normalised(text: str) -> str:
    """Lower case words and numbers only: what makes two prompts the same prompt."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def _tokens(text: str) -> list[str]:
    # "an" before a vowel and "a" before a consonant are one word: swapping "apple" for "pear"
    # changes the article, not the sentence.
    return ["a" if token == "an" else token for token in words_of([text])]


def similarity_without(concept_prompt: str, anchor_prompt: str, concept: str, anchor: str | None) -> float:
    """How much of the sentence the anchor prompt kept: the token-level match ratio (difflib) of
    the two prompts after the concept is removed from the concept prompt and the anchor from the
    anchor prompt. 1.0 for a pure replacement."""
    rest_of_concept_prompt = _tokens(concept_pattern(concept).sub(" ", concept_prompt))
    rest_of_anchor_prompt = _tokens(concept_pattern(anchor).sub(" ", anchor_prompt) if anchor else anchor_prompt)
    if not rest_of_concept_prompt and not rest_of_anchor_prompt:
        return 1.0
    return difflib.SequenceMatcher(None, rest_of_concept_prompt, rest_of_anchor_prompt, autojunk=False).ratio()


def infer_anchor(concept_prompt: str, anchor_prompt: str, concept: str) -> str | None:
    """The words of the anchor prompt that stand where the concept stood in the concept prompt (for
    a pair whose reply left its anchor out); None when the concept was only deleted."""
    concept_tokens, anchor_tokens = TOKEN.findall(concept_prompt), TOKEN.findall(anchor_prompt)
    pattern = concept_pattern(concept)
    concept_words = {token.casefold() for match in pattern.finditer(concept_prompt) for token in TOKEN.findall(match[0])}
    matcher = difflib.SequenceMatcher(None, [t.casefold() for t in concept_tokens],
                                      [t.casefold() for t in anchor_tokens], autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "replace" and any(t.casefold() in concept_words for t in concept_tokens[i1:i2]):
            return " ".join(anchor_tokens[j1:j2]) or None
    return None


def check_pair(item, concept: str, *, min_similarity: float = DEFAULT_MIN_SIMILARITY):
    """(the cleaned pair {concept_prompt, anchor_prompt, anchor, similarity}, None), or (None, the
    reason it is rejected). Duplicates are found by validate_items, not here."""
    if not isinstance(item, dict):
        return None, NOT_AN_OBJECT
    concept_prompt, anchor_prompt, anchor = (field(item, keys)
                                             for keys in (CONCEPT_PROMPT_KEYS, ANCHOR_PROMPT_KEYS, ANCHOR_KEYS))
    if (not isinstance(concept_prompt, str) or not concept_prompt.strip() or not isinstance(anchor_prompt, str)
            or not anchor_prompt.strip()):
        return None, MISSING_FIELD
    if any(isinstance(text, str) and unencodable(text) is not None for text in (concept_prompt, anchor_prompt, anchor)):
        return None, INVALID_TEXT
    concept_prompt, anchor_prompt = " ".join(concept_prompt.split()), " ".join(anchor_prompt.split())
    anchor = " ".join(anchor.split()) if isinstance(anchor, str) and anchor.strip() else None
    pattern = concept_pattern(concept)
    if normalised(concept_prompt) == normalised(anchor_prompt):
        return None, IDENTICAL
    if not pattern.search(concept_prompt):
        return None, CONCEPT_MISSING
    if pattern.search(anchor_prompt):
        return None, CONCEPT_IN_ANCHOR_PROMPT
    if anchor is None:
        anchor = infer_anchor(concept_prompt, anchor_prompt, concept)
    elif not concept_pattern(anchor).search(anchor_prompt):
        return None, ANCHOR_MISSING
    similarity = similarity_without(concept_prompt, anchor_prompt, concept, anchor)
    if similarity < min_similarity:
        return None, REWRITTEN
    return {"concept_prompt": concept_prompt, "anchor_prompt": anchor_prompt, "anchor": anchor,
            "similarity": round(similarity, 4)}, None


def validate_items(items, concept: str, *, seen: set | None = None,
                   min_similarity: float = DEFAULT_MIN_SIMILARITY) -> tuple[list[dict], list[dict]]:
    """(accepted pairs, rejected pairs with their "reason") for the objects of one reply; `seen`
    (the normalised pairs accepted so far, updated here) removes duplicates across replies."""
    seen = set() if seen is None else seen
    accepted, rejected = [], []
    for item in items:
        pair, reason = check_pair(item, concept, min_similarity=min_similarity)
        if pair is not None:
            key = (normalised(pair["concept_prompt"]), normalised(pair["anchor_prompt"]))
            if key in seen:
                pair, reason = None, DUPLICATE
            else:
                seen.add(key)
                accepted.append(pair)
        if pair is None:
            shown = item if isinstance(item, dict) else {"value": item}
            record = {short_text(key, 80): _recorded(value) for key, value in shown.items() if isinstance(key, str)}
            rejected.append({**record, "reason": reason})
    return accepted, rejected


def _recorded(value):
    """A rejected pair's field as the summary keeps it: text and numbers as they are (a lone
    surrogate as its escape text, so the summary can be written), a list or an object only as its
    kind and length: a reply may nest one thousands deep, which json.dumps cannot write."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN would make the summary JSON that only Python reads
    if value is None or isinstance(value, (bool, int, float)):
        return value
    kind = "list" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__
    return f"<a JSON {kind}" + (f" of {len(value)}>" if isinstance(value, (list, dict)) else ">")
