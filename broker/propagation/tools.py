"""What the parts that deliver are handed: the database, home, the peers' clients, the ledger,
the settings and the clocks (one value, so that no part reaches for them itself)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from broker.home import HomeClient
from broker.propagation.claims import Ledger
from broker.propagation.delivery import Clock, PeerClients, WorkerSettings, utc

__all__ = ["Tools"]


@dataclass(frozen=True)
class Tools:
    """What the parts that deliver use: the database, home, the peers' clients, the ledger that
    settles deliveries, the settings, and the clocks (``clock``: epoch seconds, for what is
    compared with the database's time; ``monotonic``: for intervals here)."""

    pool: asyncpg.Pool
    home: HomeClient
    clients: PeerClients
    ledger: Ledger
    settings: WorkerSettings
    clock: Clock
    monotonic: Clock

    def now(self) -> datetime:
        """The wall clock's time, as the database compares it."""
        return utc(self.clock)
