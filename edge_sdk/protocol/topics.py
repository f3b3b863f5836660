"""MQTT topic names, all under `fedpeft/<federation>/`, and the identifier rules that keep them safe."""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "fedpeft"
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_identifier(value: str, what: str) -> str:
    """`value` if it is a safe federation/client id (no MQTT wildcards or separators), else ValueError."""
    if not isinstance(value, str) or not _IDENTIFIER.match(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit."
        )
    return value


@dataclass(frozen=True)
class Topics:
    """The topics of one federation. Clients publish only under `clients/<own id>/` (broker ACL)."""

    federation: str

    def __post_init__(self) -> None:
        check_identifier(self.federation, "Federation id")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.federation}"

    @property
    def config(self) -> str:
        """Retained federation config (rank policy, tiers, training settings), from the aggregator."""
        return f"{self.prefix}/config"

    @property
    def task(self) -> str:
        """Retained task of the open round (or the 'finished' marker), from the aggregator."""
        return f"{self.prefix}/task"

    @property
    def result(self) -> str:
        """Retained result and metrics of the last closed round, from the aggregator."""
        return f"{self.prefix}/result"

    def global_chunk(self, rank: int, index: int) -> str:
        """Retained chunk `index` of the global adapter at tier `rank`, from the aggregator."""
        return f"{self.prefix}/global/r{rank}/{index}"

    def global_chunks(self, rank: int) -> str:
        return f"{self.prefix}/global/r{rank}/+"

    def status(self, client_id: str) -> str:
        """Retained join/profile/online status of a client; its last will sets it offline."""
        return f"{self.prefix}/clients/{check_identifier(client_id, 'Client id')}/status"

    def update(self, client_id: str) -> str:
        """A client's adapter update chunks for the open round."""
        return f"{self.prefix}/clients/{check_identifier(client_id, 'Client id')}/update"

    def notice(self, client_id: str) -> str:
        """Aggregator → client: a refusal or a rejected update, with the reason."""
        return f"{self.prefix}/notice/{check_identifier(client_id, 'Client id')}"

    @property
    def all_statuses(self) -> str:
        return f"{self.prefix}/clients/+/status"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/clients/+/update"

    def client_of(self, topic: str) -> str | None:
        """The client id in a `clients/<id>/...` topic of this federation, or None."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[:3] == [ROOT, self.federation, "clients"] and _IDENTIFIER.match(parts[3]):
            return parts[3]
        return None
