"""Exceptions raised by meft_fx."""
from __future__ import annotations


class ConversionError(RuntimeError):
    """Nothing in the model could be rewritten into reversible couplings, or capture failed.

    `reasons` lists, for every candidate region that was looked at and rejected, why (each names
    the pass that decided, in brackets).
    """

    hint = ("To see why one node did not match: meft_fx.debug_node(model, NODE, example_inputs=...) or "
            "`python -m meft_fx inspect MODEL --debug-node NODE`.")

    def __init__(self, message: str, reasons: list[str] | None = None):
        self.reasons = list(reasons or [])
        if self.reasons:
            message = message + "\n" + "\n".join(f"  - {r}" for r in self.reasons)
            if self.hint:
                message += "\n" + self.hint
        super().__init__(message)


class CaptureError(ConversionError):
    """The model could not be traced (torch.export and torch.fx both failed).

    Each reason names the tracer, its error and, where known, the model's source line it failed on.
    """

    hint = ""


class ReconstructionError(RuntimeError):
    """The reversible backward could not rebuild a coupling's inputs exactly."""


class AdapterMismatchError(ValueError):
    """Saved adapters (`meft_fx.load_adapters`) do not fit the model: another base model, another
    MEFT configuration, or other parameter names/shapes. The message lists every difference."""
