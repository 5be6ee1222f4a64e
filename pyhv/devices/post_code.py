"""Port 0x80, where firmware writes POST codes and Linux writes for I/O delays: counted, the last code kept,
optionally logged (`--log-post`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pyhv.devices.device import Claim, device_region

log = logging.getLogger(__name__)


@dataclass
class PostCodeState:
    last: int = 0
    writes: int = 0


class PostCode:
    SNAPSHOT = True                  # `state` is all it keeps (pyhv/machine/snapshot.py)
    SIZE = 1
    PORT = 0x80

    def __init__(self, name: str = "post", log_codes: bool = False) -> None:
        self.name = name
        self.log_codes = log_codes
        self.state = PostCodeState()

    def read(self, offset: int, size: int) -> int:
        return self.state.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.state.last = value & 0xFF
        self.state.writes += 1
        if self.log_codes:
            log.info("POST code %#04x", value & 0xFF)


    def claims(self) -> list[Claim]:
        return [Claim.port(self.PORT, device_region(self, self.SIZE))]

    def reset(self) -> None:
        self.state = PostCodeState()
