import pytest

from habla.speech.text import ALPHABET, TextRejected, normalize_text, uncovered_characters


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("¿Qué tal, señor Núñez?", "qué tal señor núñez"),
        ("¡Hola!  «Buenos días» — dijo…", "hola buenos días dijo"),
        ("“Comillas” y \"rectas\" y 'simples'", "comillas y rectas y simples"),
        ("Pingüino ÁRBOL", "pingüino árbol"),
        ("à la façon de Möbius, São Paulo", "a la facon de mobius sao paulo"),
        ("Straße", "strasse"),
        ("tab\tand\nnewline", "tab and newline"),
        ("guión-medio y punto.final", "guión medio y punto final"),
    ],
)
def test_normalizes_spanish(sentence, expected):
    assert normalize_text(sentence) == expected


def test_nfc_composes_decomposed_accents():
    decomposed = "cafe\u0301 nin\u0303o"  # e + combining acute, n + combining tilde
    assert normalize_text(decomposed) == "café niño"


@pytest.mark.parametrize(
    ("sentence", "reason", "detail"),
    [
        ("Tengo 3 gatos", "unsupported_chars", "3"),
        ("Cuesta 5 $", "unsupported_chars", "$5"),
        ("Привет amigo", "unsupported_chars", "привет"),
        ("hola 😀", "unsupported_chars", "😀"),
        ("", "empty_text", ""),
        ("¿?¡! …", "empty_text", ""),
    ],
)
def test_rejects_what_cannot_be_spelled(sentence, reason, detail):
    with pytest.raises(TextRejected) as info:
        normalize_text(sentence)
    assert info.value.reason == reason
    assert set(info.value.detail) == set(detail)


def test_output_alphabet_is_the_vocabulary():
    assert ALPHABET[0] == " " and len(set(ALPHABET)) == len(ALPHABET) == 34
    assert set(normalize_text("Él comió ñandú y kiwi, ¿vale?")) <= set(ALPHABET)


def test_uncovered_characters():
    assert uncovered_characters(["ñu", "ab"], "abu ") == {"ñ"}
