"""What the API needs from the composition root, and nothing more.

The API talks to the store and the blob store through their interfaces and knows which models
are served (and on which endpoints). It never imports the scheduler or the worker: creating a
batch writes a `validating` row, cancelling writes `cancelling`; background duties do the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backfill.blobs.base import Blobs
from backfill.settings import Settings
from backfill.store.base import Store


@dataclass
class ApiContext:
    settings: Settings
    store: Store
    blobs: Blobs
    #: public model name -> endpoints it serves (e.g. {"/v1/chat/completions", ...})
    models: dict[str, frozenset[str]] = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    def now(self) -> int:
        return int(self.clock())
