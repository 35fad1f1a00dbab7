"""What a test's stand-in stream needs beyond its chunks to be an ``AudioStream``."""

from __future__ import annotations


class AdmittedAtOnce:
    """A stand-in stream that never waits for an engine slot."""

    queued = False

    async def wait_admitted(self) -> bool:
        return True
