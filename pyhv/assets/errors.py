"""The error guest-asset building raises for problems the user can fix (missing tools, apt failures, bad --add)."""
from __future__ import annotations

from pyhv.errors import PyhvError


class GuestAssetError(PyhvError):
    """A guest kernel or initramfs cannot be built; the message says why and the hint what to do."""
