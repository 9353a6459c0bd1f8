"""Fixtures shared by the unit tests.

The in-process API tests (`pytestmark = pytest.mark.anyio`) run on asyncio only, the loop
uvicorn serves the app on (anyio's own fixture would add trio wherever trio is installed).
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
