"""The vocabulary a model trains on: the train text's characters checked against a character vocabulary or a
SentencePiece tokenizer, and the BPE tokenizer built from the train text (the same on every rank) and published
under ``DST/tokenizer``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from habla.core import storage
from habla.core.errors import HablaError
from habla.core.layout import TrainLayout
from habla.speech.text import uncovered_characters

log = logging.getLogger("habla.train")

SEED = 1234  # every rank builds the same tokenizer from the same text


def check_characters(texts: list[str], vocabulary: Sequence[str], what: str) -> None:
    """NeMo's char parser lower-cases; anything else outside the vocabulary would be trained as ⁇."""
    missing = uncovered_characters((t.strip().lower() for t in texts), vocabulary)
    if missing:
        shown = " ".join(repr(c) for c in sorted(missing)[:12])
        raise HablaError(
            f"the train text uses {len(missing)} character(s) the {what} lacks: {shown} "
            "(normalize the text with habla prepare, or add them to the vocabulary)"
        )


def check_tokenizer(model_file: Path, texts: list[str]) -> None:
    """Every character of the train text must encode to something other than SentencePiece's unknown piece."""
    missing = uncovered_by_tokenizer(model_file, texts)
    if missing:
        shown = " ".join(repr(c) for c in missing[:12])
        raise HablaError(f"the train text uses {len(missing)} character(s) the tokenizer {model_file} lacks: {shown}")


def uncovered_by_tokenizer(model_file: Path, texts: list[str]) -> list[str]:
    """The characters of ``texts`` that encode to SentencePiece's unknown piece, sorted."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    chars = {c for t in texts for c in t if not c.isspace()}
    return sorted(c for c in chars if sp.unk_id() in sp.encode(c))


def pieces(model_file: Path) -> list[str]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def build(cfg, texts: list[str], scratch: Path) -> Path:
    """A SentencePiece tokenizer of the train text, in a local folder named after its inputs.

    Every rank builds it (no rank waits for another before the process group exists): the same text, settings
    and seed give the same pieces. Ranks sharing a disk share the folder (built aside, renamed into place).
    """
    tok = cfg.model.tokenizer
    settings = {"vocab_size": int(tok.get("vocab_size", 256)), "spe_type": str(tok.get("spe_type", "bpe")),
                "character_coverage": float(tok.get("character_coverage", 1.0))}  # fmt: skip
    digest = hashlib.sha1(json.dumps([settings, texts], ensure_ascii=False).encode()).hexdigest()[:16]
    folder = scratch / "tokenizers" / digest
    if (folder / "tokenizer.model").is_file():
        return folder
    import sentencepiece
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        text_file = tmp / "text.txt"
        text_file.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        sentencepiece.set_random_generator_seed(SEED)
        create_spt_model(
            str(text_file), vocab_size=settings["vocab_size"], sample_size=-1, do_lower_case=False,
            tokenizer_type=settings["spe_type"], output_dir=str(tmp / "out"),
            character_coverage=settings["character_coverage"],
        )  # fmt: skip
        try:
            os.rename(tmp / "out", folder)  # atomic; another rank on this disk may have won the race
        except OSError:
            if not (folder / "tokenizer.model").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tokenizer: %d pieces from %d sentences", len(pieces(folder / "tokenizer.model")), len(texts))
    return folder


def publish(folder: Path, dst: TrainLayout, resuming: bool, rank_zero: bool) -> None:
    """DST/tokenizer is the tokenizer of the run; a resumed run must have rebuilt exactly the same one."""
    published = storage.join(dst.tokenizer, "tokenizer.model")
    if resuming and storage.exists(published):
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_file(published, Path(tmp) / "tokenizer.model")
            if pieces(Path(tmp) / "tokenizer.model") != pieces(folder / "tokenizer.model"):
                raise HablaError(
                    f"the tokenizer built now differs from {published}, which the checkpoint was trained with: "
                    "the train text or model.tokenizer settings changed; resume with the same ones or use a new --out"
                )
    elif rank_zero:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                storage.upload_file(path, storage.join(dst.tokenizer, path.name))
