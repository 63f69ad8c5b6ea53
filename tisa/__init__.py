"""tisa: end-to-end encrypted reports through a relay that forwards and never reads.

The protocol core. It does no I/O and imports neither trio nor socket, so a client on any
event loop can embed it; ``relay`` and ``clients`` are the trio nodes built on top.
"""

from tisa.errors import (
    ArrangementNotEffective,
    KeyFileError,
    LimitExceeded,
    LocalError,
    ProtocolError,
    Reason,
    Refused,
    RemoteError,
    TisaError,
    UsageError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "ArrangementNotEffective",
    "KeyFileError",
    "LimitExceeded",
    "LocalError",
    "ProtocolError",
    "Reason",
    "Refused",
    "RemoteError",
    "TisaError",
    "UsageError",
    "VerificationError",
    "__version__",
]
