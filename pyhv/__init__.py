"""pyhv: a KVM virtual machine monitor in Python."""
from __future__ import annotations

from pyhv.version import __version__

__all__ = ["__version__", "VM"]


def __getattr__(name: str):  # lazy: keep `import pyhv` cheap for the CLI's start-up time
    if name == "VM":
        from pyhv.api import VM

        return VM
    raise AttributeError(name)
