"""Exceptions raised by meft_fx."""
from __future__ import annotations


class ConversionError(RuntimeError):
    """Nothing in the model could be rewritten into reversible couplings, or capture failed.

    `reasons` lists, for every candidate region that was looked at and rejected, why.
    """

    def __init__(self, message: str, reasons: list[str] | None = None):
        self.reasons = list(reasons or [])
        if self.reasons:
            message = message + "\n" + "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(message)


class CaptureError(ConversionError):
    """The model could not be traced (torch.export and torch.fx both failed)."""


class ReconstructionError(RuntimeError):
    """The reversible backward could not rebuild a coupling's inputs exactly."""
