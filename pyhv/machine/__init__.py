"""Machine assembly: `Machine` (lifecycle and vCPU threads, `machine.py`), one file per board (`pc.py`,
`microvm.py`), vCPU threads (`vcpu.py`), KVM interrupt routes (`irq_routing.py`), coalesced I/O."""
from pyhv.machine.machine import Machine

__all__ = ["Machine"]
