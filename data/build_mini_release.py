#!/usr/bin/env python3
"""Build the bundled mini Common Voice Spanish releases from Debian's Asterisk Spanish prompts.

    python data/build_mini_release.py            # downloads the two .deb packages with apt-get
    python data/build_mini_release.py --debs D   # or uses the .deb files already in folder D

Source audio: ``asterisk-core-sounds-es-wav`` (Allison Smith's Mexican-Spanish prompts, 16-bit 8 kHz WAV,
CC-BY-SA-3.0); transcripts: ``core-sounds-es.txt.gz`` of ``asterisk-core-sounds-es``. The prompts are
re-encoded to MP3 at the sample rates Common Voice serves (48 kHz mostly, 44.1 and 32 kHz, a few stereo) and
laid out as Common Voice locale folders:

* ``data/mini-es-v25/es`` - the columns of Common Voice 17.0-25.0 and ``clip_durations.tsv``;
* ``data/mini-es-v8/es``  - the columns of Common Voice 8.0 (``accent``), no duration table.

Everything is deterministic: the same packages give byte-identical TSVs (MP3 bytes depend on the LAME build).
Speaker ids, gender, age and accent are synthetic labels (all prompts are one voice); they exist so that
splits, the leakage guard and the per-group breakdowns have something to work on.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

HERE = Path(__file__).resolve().parent
PACKAGES = ("asterisk-core-sounds-es-wav", "asterisk-core-sounds-es")
SOUNDS = "usr/share/asterisk/sounds/es_MX_f_Allison"
TRANSCRIPTS = "usr/share/doc/asterisk-core-sounds-es/core-sounds-es.txt.gz"
SEED = 20260309

# Synthetic speakers: (gender, age, accent) in Common Voice 17+ vocabulary and in 8.0 vocabulary.
SPEAKERS = [
    ("female_feminine", "twenties", "México", "female", "mexicano"),
    ("male_masculine", "thirties", "Andino-Pacífico", "male", "andino"),
    ("female_feminine", "fourties", "España: Centro-Sur peninsular", "female", "centrosurpeninsular"),
    ("male_masculine", "twenties", "Caribe", "male", "caribe"),
    ("", "", "", "", ""),
    ("female_feminine", "fifties", "Rioplatense", "female", "rioplatense"),
    ("male_masculine", "teens", "México", "male", "mexicano"),
    ("female_feminine", "thirties", "Chileno", "female", "chileno"),
    ("male_masculine", "sixties", "España: Norte peninsular", "male", "nortepeninsular"),
    ("female_feminine", "twenties", "Caribe", "female", "caribe"),
    ("male_masculine", "fourties", "México", "male", "mexicano"),  # dev
    ("female_feminine", "twenties", "Andino-Pacífico", "female", "andino"),  # dev
    ("", "thirties", "Rioplatense", "", "rioplatense"),  # dev
    ("female_feminine", "thirties", "México", "female", "mexicano"),  # test
    ("male_masculine", "twenties", "España: Centro-Sur peninsular", "male", "centrosurpeninsular"),  # test
    ("female_feminine", "fifties", "Caribe", "female", "caribe"),  # test
]
TRAIN_SPEAKERS, DEV_SPEAKERS, TEST_SPEAKERS = range(0, 10), range(10, 13), range(13, 16)
V25_COLUMNS = [
    "client_id",
    "path",
    "sentence_id",
    "sentence",
    "sentence_domain",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "variant",
    "locale",
    "segment",
]
V8_COLUMNS = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accent", "locale", "segment"]


LICENSE = """cc-by-sa-3.0
Recordings: the Spanish Asterisk core sound prompts by Digium, Inc., licensed under CC BY-SA 3.0
(https://creativecommons.org/licenses/by-sa/3.0/); the MP3 files and TSVs here are an adaptation
(re-encoded, re-sampled, re-organised) shared under the same licence (data/README.md).
"""


def client_id(speaker: int) -> str:
    return hashlib.sha512(f"habla-mini-speaker-{speaker}".encode()).hexdigest()


def fetch_packages(debs: Path | None, work: Path) -> Path:
    if debs is None:
        debs = work / "debs"
        debs.mkdir()
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    root = work / "root"
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def read_prompts(root: Path) -> list[tuple[str, str, Path]]:
    """(name, sentence, wav) for every prompt with a spoken transcript and a recording."""
    prompts = []
    with gzip.open(root / TRANSCRIPTS, "rt", encoding="utf-8") as f:
        for line in f:
            name, sep, sentence = line.partition(":")
            sentence = sentence.strip()
            if not sep or line.startswith(";") or not sentence or sentence.startswith("["):
                continue
            wav = root / SOUNDS / f"{name.strip()}.wav"
            if wav.exists():
                prompts.append((name.strip(), sentence, wav))
    return sorted(prompts)


def encode_mp3(wav: Path, rate: int, stereo: bool) -> bytes:
    samples, source_rate = sf.read(wav, dtype="float32")
    samples = soxr.resample(samples, source_rate, rate, quality="VHQ")
    if stereo:  # a second channel slightly quieter, as phone and laptop microphones give
        samples = np.stack([samples, 0.8 * samples], axis=1)
    out = io.BytesIO()
    sf.write(out, samples, rate, format="MP3", bitrate_mode="VARIABLE", compression_level=0.9)
    return out.getvalue()


def write_tsv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    lines = ["\t".join(columns)] + ["\t".join(row.get(c, "") for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build(root: Path, out: Path) -> None:
    rng = random.Random(SEED)
    prompts = read_prompts(root)
    rng.shuffle(prompts)
    # 120 train, 30 dev, 30 test, 40 that are only in validated.tsv, 6 invalidated.
    groups = {"train": prompts[:120], "dev": prompts[120:150], "test": prompts[150:180]}
    extra, invalid = prompts[180:220], prompts[220:226]
    speakers_of = {"train": TRAIN_SPEAKERS, "dev": DEV_SPEAKERS, "test": TEST_SPEAKERS}

    v25 = out / "mini-es-v25" / "es"
    v8 = out / "mini-es-v8" / "es"
    for folder in (v25, v8):
        shutil.rmtree(folder.parent, ignore_errors=True)
        (folder / "clips").mkdir(parents=True)

    clip_number = 40_000_000
    rows: dict[str, list[dict[str, str]]] = {s: [] for s in ("train", "dev", "test", "validated", "invalidated")}
    durations: list[tuple[str, int]] = []

    def add_clip(wav: Path, sentence: str, speaker: int) -> dict[str, str]:
        nonlocal clip_number
        clip_number += 1
        name = f"common_voice_es_{clip_number}.mp3"
        rate = rng.choices([48_000, 44_100, 32_000], weights=[70, 15, 15])[0]
        data = encode_mp3(wav, rate, stereo=rng.random() < 0.1)
        (v25 / "clips" / name).write_bytes(data)
        samples, got_rate = sf.read(io.BytesIO(data), dtype="float32")
        durations.append((name, round(1000 * len(samples) / got_rate)))
        gender, age, accent, _, _ = SPEAKERS[speaker]
        return {
            "client_id": client_id(speaker),
            "path": name,
            "sentence": sentence,
            "sentence_id": hashlib.sha256(sentence.encode()).hexdigest(),
            "sentence_domain": "",
            "up_votes": "2",
            "down_votes": "0",
            "age": age,
            "gender": gender,
            "accents": accent,
            "variant": "",
            "locale": "es",
            "segment": "",
            "_speaker": str(speaker),
        }

    for split, items in groups.items():
        for i, (_, sentence, wav) in enumerate(items):
            speakers = speakers_of[split]
            row = add_clip(wav, sentence, speakers[i % len(speakers)])
            rows[split].append(row)
            rows["validated"].append(row)
    # validated-only clips: most by train speakers (usable with --train-source validated); some by a dev
    # speaker, some reading a test sentence again (both must be kept out of training by the leakage guard).
    test_sentences = [r["sentence"] for r in rows["test"]]
    for i, (_, sentence, wav) in enumerate(extra):
        speaker = DEV_SPEAKERS[0] if i % 8 == 0 else TRAIN_SPEAKERS[i % len(TRAIN_SPEAKERS)]
        if i % 8 == 1:
            sentence = test_sentences[i % len(test_sentences)]
        rows["validated"].append(add_clip(wav, sentence, speaker))
    for i, (_, sentence, wav) in enumerate(invalid):
        row = add_clip(wav, sentence, TRAIN_SPEAKERS[i % len(TRAIN_SPEAKERS)])
        row.update(up_votes="0", down_votes="2")
        rows["invalidated"].append(row)
    # Two slips real releases have had: a row listed twice, and a dev clip also listed in train.
    rows["train"].append(dict(rows["train"][7]))
    rows["train"].append(dict(next(r for r in rows["dev"] if not any(c.isdigit() for c in r["sentence"]))))

    for split, split_rows in rows.items():
        write_tsv(v25 / f"{split}.tsv", V25_COLUMNS, split_rows)
    write_tsv(v25 / "other.tsv", V25_COLUMNS, [])
    (v25 / "clip_durations.tsv").write_text(
        "clip\tduration[ms]\n" + "".join(f"{n}\t{ms}\n" for n, ms in durations), encoding="utf-8"
    )

    # The CV 8.0 copy: 20 train, 10 dev, 10 test, old column names and vocabulary, no duration table.
    for split, count in (("train", 20), ("dev", 10), ("test", 10)):
        old_rows = []
        for row in rows[split][:count]:
            _, _, _, gender, accent = SPEAKERS[int(row["_speaker"])]
            old_rows.append({**row, "gender": gender, "accent": accent})
            shutil.copyfile(v25 / "clips" / row["path"], v8 / "clips" / row["path"])
        write_tsv(v8 / f"{split}.tsv", V8_COLUMNS, old_rows)
        if split == "train":
            write_tsv(v8 / "validated.tsv", V8_COLUMNS, [])
    validated_v8 = [r for s in ("train", "dev", "test") for r in (v8 / f"{s}.tsv").read_text().splitlines()[1:]]
    (v8 / "validated.tsv").write_text("\t".join(V8_COLUMNS) + "\n" + "\n".join(validated_v8) + "\n")

    for folder in (v25, v8):  # the data's licence travels with the release (habla.speech.releases.release_license)
        (folder / "LICENSE").write_text(LICENSE, encoding="utf-8")

    total = sum(ms for _, ms in durations) / 1000
    size = sum(p.stat().st_size for p in out.rglob("*.mp3"))
    print(f"{len(durations)} clips, {total / 60:.1f} min of audio, {size / 1e6:.1f} MB of MP3 under {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debs", type=Path, help="folder holding the two .deb files (default: apt-get download)")
    parser.add_argument("--out", type=Path, default=HERE, help="where mini-es-v25/ and mini-es-v8/ go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        build(fetch_packages(args.debs, Path(work)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
