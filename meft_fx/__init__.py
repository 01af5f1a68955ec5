"""meft_fx: make a pretrained transformer reversible (MEFT, NeurIPS 2023) with a graph-rewriting pass.

    rev = meft_fx.convert(model)                 # MEFT3 by default
    rev(**batch).loss.backward()                 # backward rebuilds activations
    print(meft_fx.explain(rev))
"""
from .checkpoint import load_adapters, save_adapters
from .compile import compile, compile_couplings, compiled_couplings
from .config import MEFTConfig
from .convert import convert
from .coupling import Coupling, ReversibleStack
from .errors import AdapterMismatchError, CaptureError, ConversionError, ReconstructionError
from .explain import Explanation, explain
from .draw import draw
from .inspect import graphs, show, to_networkx

__all__ = ["MEFTConfig", "convert", "explain", "Explanation", "ConversionError", "CaptureError",
           "ReconstructionError", "AdapterMismatchError", "Coupling", "ReversibleStack", "save_adapters",
           "load_adapters"]
__all__ += ["graphs", "show", "to_networkx", "draw"]
__all__ += ["compile", "compile_couplings", "compiled_couplings"]
__version__ = "0.1.0"
