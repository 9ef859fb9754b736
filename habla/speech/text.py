"""Spanish text normalization for a character vocabulary, shared by data preparation, training and scoring.

The rules: Unicode NFC, lower case, foreign diacritics folded (à→a, ç→c, ö→o), punctuation dropped
(including ¿ ¡ « » “ ” — …), whitespace collapsed to single spaces. What remains must be made of
``ALPHABET`` (space, a–z, ñ, á é í ó ú ü). Anything else (digits, symbols, other scripts, emoji) cannot be
spelled out safely, so the sentence is rejected with a reason instead of being silently altered.
"""

from __future__ import annotations

import unicodedata

#: The character vocabulary of the char models, in a fixed order (index = label id).
ALPHABET: tuple[str, ...] = tuple(" abcdefghijklmnopqrstuvwxyzáéíñóúü")
_ALLOWED = frozenset(ALPHABET)

# Letters without a Unicode decomposition that still have an obvious Latin spelling.
_LIGATURES = {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"}


class TextRejected(ValueError):
    """A sentence that cannot be normalized into the vocabulary. ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _fold(char: str) -> str:
    """Map one lower-case character to vocabulary characters, a space (punctuation), or leave it alone."""
    if char in _ALLOWED:
        return char
    if char in _LIGATURES:
        return _LIGATURES[char]
    category = unicodedata.category(char)
    if category[0] == "P" or category[0] == "Z" or char in "\t\n\r\x0b\x0c":
        return " "
    if category[0] == "L":
        base = unicodedata.normalize("NFD", char)[0]
        if base in _ALLOWED:  # a Latin letter with a foreign diacritic (à, ç, ö, ã, ...)
            return base
    return char


# Only characters outside the vocabulary go through _fold; cache those decisions.
_FOLD_CACHE: dict[int, str] = {}


def normalize_text(sentence: str) -> str:
    """Normalize a Spanish sentence, or raise :class:`TextRejected` (``empty_text``, ``unsupported_chars``)."""
    text = unicodedata.normalize("NFC", sentence).lower()
    odd = set(text) - _ALLOWED
    if odd:  # str.translate does the per-character work in C
        for char in odd:
            if ord(char) not in _FOLD_CACHE:
                _FOLD_CACHE[ord(char)] = _fold(char)
        text = text.translate(_FOLD_CACHE)
    text = " ".join(text.split())
    bad = set(text) - _ALLOWED
    if bad:
        raise TextRejected("unsupported_chars", "".join(sorted(bad)))
    if not text:
        raise TextRejected("empty_text")
    return text


def uncovered_characters(texts, vocabulary) -> set[str]:
    """Characters used in ``texts`` that ``vocabulary`` lacks (what shows up as ``⁇`` in predictions)."""
    vocab = set(vocabulary)
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    return seen - vocab
