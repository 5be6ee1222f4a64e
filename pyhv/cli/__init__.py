"""The command line: `pyhv run` and `info` (`commands.py`), the virsh-style domain commands (`lifecycle.py`),
what `run` does besides the machine (`runargs.py`), and libvirt domain XML (`domain_xml.py`)."""
from pyhv.cli.commands import main

__all__ = ["main"]
