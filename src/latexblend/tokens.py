"""Tokens: CLIP tokenizers from the shipped vocabulary, identifier tokens, and concept spans.

A concept's *span* is ``[slot, noun tokens...]`` (METHOD.md section 1): the slot is the identifier
``<new1>`` at training time, or the word before the noun (an article such as ``a``) at inference.
Spans are always found from token ids, never from fixed positions.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from latexblend.errors import LatexBlendError

MAX_TOKENS = 77
BOS_ID = 49406
EOS_ID = 49407
#: CLIP's BPE file holds 48,894 merges after its header line (49152 - 256 - 2).
_NUM_MERGES = 49152 - 256 - 2
_PLACEHOLDER = re.compile(r"<([A-Za-z0-9][A-Za-z0-9_.\-]*)>")
#: What is left of a placeholder after the whole ones are taken out: ``<`` before a letter, or ``>`` after a name.
_UNMATCHED = re.compile(r"(<)[A-Za-z][A-Za-z0-9_.\-]*|[A-Za-z0-9_.\-]*[A-Za-z0-9](>)")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (GPT-2 byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order: printable bytes first, then the others (CLIP's vocabulary order)


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of CLIP's BPE (49,408 tokens) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = resources.files("latexblend").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(blob).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer built offline from the shipped vocabulary (SDXL's second one pads with ``!``)."""

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=MAX_TOKENS)


def token_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without BOS/EOS; a clear error if it is empty."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise LatexBlendError(f"'{text}' has no tokens")
    return list(ids)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``[BOS, ..., EOS]`` ids of ``prompt``, refusing more than 77 tokens (CLIP would cut them)."""
    ids = list(tokenizer(prompt, add_special_tokens=True).input_ids)
    if len(ids) > MAX_TOKENS:
        raise LatexBlendError(
            f"prompt is {len(ids)} tokens, over CLIP's limit of {MAX_TOKENS}: shorten it ('{prompt[:40]}...')"
        )
    return ids


# --------------------------------------------------------------------------- identifier tokens


def add_identifier_token(tokenizers: Sequence, text_encoders: Sequence, token: str = "<new1>",
                         init_token: str = "pll") -> int:
    """Add ``token`` to every tokenizer and text encoder, its embedding row copied from ``init_token``.

    Returns the new token's id, which is the same in all tokenizers (they share CLIP's vocabulary).
    Calling it again with the same token is a no-op that returns the existing id.
    """
    ids = set()
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        init = tokenizer(init_token, add_special_tokens=False).input_ids
        if len(init) != 1:
            raise LatexBlendError(f"init token '{init_token}' is {len(init)} tokens; choose a single-token word")
        added = tokenizer.add_tokens(token)
        new_id = tokenizer.convert_tokens_to_ids(token)
        embeddings = encoder.get_input_embeddings()
        if added or embeddings.num_embeddings <= new_id:
            encoder.resize_token_embeddings(len(tokenizer))
            embeddings = encoder.get_input_embeddings()
            with _no_grad():
                embeddings.weight[new_id] = embeddings.weight[init[0]]
        ids.add(new_id)
    if len(ids) != 1:
        raise LatexBlendError(f"'{token}' got different ids in the two tokenizers: {sorted(ids)}")
    return ids.pop()


def _no_grad():
    return torch.no_grad()


# --------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class Span:
    """Token positions ``[start, start + length)`` of one concept: its slot then its noun tokens."""

    name: str
    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)


def find_sublist(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> list[int]:
    """All indices ``i >= start`` where ``ids[i:i+len(pattern)] == pattern``."""
    n = len(pattern)
    return [i for i in range(start, len(ids) - n + 1) if list(ids[i : i + n]) == list(pattern)]


def _is_word_end(tokenizer, token_id: int) -> bool:
    if token_id in (BOS_ID, EOS_ID):
        return True
    token = tokenizer.convert_ids_to_tokens(int(token_id))
    return token is None or token.endswith("</w>") or token in tokenizer.get_added_vocab()


def locate_noun_spans(tokenizer, ids: Sequence[int], concepts: Sequence[tuple[str, Sequence[int]]],
                      taken: Sequence[Span] = ()) -> list[Span]:
    """Spans ``[slot, noun...]`` for ``concepts`` (name, noun ids) in the prompt ids ``ids``.

    The k-th concept of a class takes the k-th free whole-word occurrence of its noun (an occurrence
    inside a longer word, such as ``dog`` in ``hotdog``, does not count). The slot is the token before
    the noun and is never BOS.
    """
    spans: list[Span] = []
    claimed = list(taken)
    for name, noun in concepts:
        noun_text = tokenizer.decode(list(noun)).strip()
        found, owners = None, []
        for pos in find_sublist(ids, noun, start=1):
            if not _is_word_end(tokenizer, ids[pos - 1]):
                continue  # inside a longer word
            owner = next((c.name for c in claimed if _noun_of(c).start <= pos < c.stop), None)
            if owner is not None:
                owners.append(owner)  # this occurrence already belongs to another concept
                continue
            found = Span(name, pos - 1, 1 + len(noun))
            break
        if found is None and owners:
            raise LatexBlendError(
                f"concepts {', '.join(repr(o) for o in owners)} and '{name}' claim the same '{noun_text}' span; "
                f"write '{noun_text}' once per concept or use placeholders such as <{name}>"
            )
        if found is None:
            raise LatexBlendError(f"concept '{name}': its noun '{noun_text}' is not in the prompt")
        if found.start == 0:
            raise LatexBlendError(
                f"concept '{name}': the prompt starts with '{noun_text}', so its slot would be the start "
                f"token; put a word before it (for example 'a {noun_text}')"
            )
        _check_overlap(found, claimed)
        claimed.append(found)
        spans.append(found)
    return spans


def _noun_of(span: Span) -> Span:
    return Span(span.name, span.start + 1, span.length - 1)


def _check_overlap(span: Span, others: Sequence[Span]) -> None:
    for other in others:
        if span.start < other.stop and other.start < span.stop:
            raise LatexBlendError(
                f"concepts '{other.name}' and '{span.name}' claim overlapping tokens "
                f"({other.start}-{other.stop - 1} and {span.start}-{span.stop - 1})"
            )


def placeholder_names(prompt: str) -> list[str]:
    """Names written as ``<name>`` in ``prompt``, in order of appearance (repeats kept). A placeholder left
    open or closed only (``<rex on grass``, ``rex> on grass``: a typo that would otherwise reach the text
    encoder as text, with no concept blended) is one error line."""
    rest = _PLACEHOLDER.sub(" ", prompt)
    typo = _UNMATCHED.search(rest)
    if typo:
        shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
        raise LatexBlendError(f"prompt '{shown}' has an unmatched '{'<' if typo.group(1) else '>'}' at "
                              f"'{typo.group(0).strip()}': write a concept as <name>")
    return _PLACEHOLDER.findall(prompt)


def expand_placeholders(prompt: str, nouns: Mapping[str, str], slot_word: str = "a") -> tuple[str, list]:
    """Replace each ``<name>`` whose name is in ``nouns`` by ``"{slot_word} {noun}"``.

    Returns the expanded prompt and ``[(name, char_start, char_end)]`` of each expansion. Names not in
    ``nouns`` are an error (an unknown placeholder would otherwise reach the text encoder as text).
    """
    pieces, marks, pos, out_len = [], [], 0, 0
    for match in _PLACEHOLDER.finditer(prompt):
        name = match.group(1)
        if name not in nouns:
            raise LatexBlendError(f"prompt uses <{name}> but no concept named '{name}' was given")
        before = prompt[pos : match.start()]
        text = f"{slot_word} {nouns[name]}"
        pieces += [before, text]
        out_len += len(before)
        marks.append((name, out_len, out_len + len(text)))
        out_len += len(text)
        pos = match.end()
    pieces.append(prompt[pos:])
    return "".join(pieces), marks


def locate_spans(tokenizer, prompt: str, concepts: Sequence[tuple[str, str, Sequence[int]]]) -> tuple[str, list[Span]]:
    """Expand placeholders and find every concept's span in the prompt.

    Args:
        prompt: user prompt, possibly with ``<name>`` placeholders.
        concepts: ``(name, class noun, noun token ids)`` per concept, in the user's order.
    Returns:
        The expanded prompt the text encoders will see and one :class:`Span` per concept, in the
        order of ``concepts``. A concept named by a placeholder takes that position; the others are
        found by their noun.
    """
    nouns = {name: noun for name, noun, _ in concepts}
    noun_ids = {name: list(ids) for name, _, ids in concepts}
    expanded, marks = expand_placeholders(prompt, nouns)
    enc = tokenizer(expanded, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    if len(ids) > MAX_TOKENS:
        raise LatexBlendError(f"prompt is {len(ids)} tokens, over CLIP's limit of {MAX_TOKENS}: shorten it")
    by_name: dict[str, Span] = {}
    placed: list[Span] = []
    for name, lo, hi in marks:
        if name in by_name:
            raise LatexBlendError(f"placeholder <{name}> appears more than once; one concept fills one span")
        inside = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a >= lo and b <= hi]
        span = Span(name, inside[0], len(inside)) if inside else None
        if span is None or ids[span.start + 1 : span.stop] != noun_ids[name]:
            raise LatexBlendError(f"placeholder <{name}> does not tokenize as its noun '{nouns[name]}'")
        _check_overlap(span, placed)
        placed.append(span)
        by_name[name] = span
    rest = [(name, noun_ids[name]) for name, _, _ in concepts if name not in by_name]
    for span in locate_noun_spans(tokenizer, ids, rest, taken=placed):
        by_name[span.name] = span
    return expanded, [by_name[name] for name, _, _ in concepts]
