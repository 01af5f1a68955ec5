"""The reversible stacks of a converted model, found by walking its modules (independent of the library's helpers)."""
from meft_fx.conversion import ConvertedModule
from meft_fx.runtime import ReversibleStack


def every_stack(model):
    """Every ReversibleStack of every captured call structure of every converted module in `model`."""
    return [st for conv in model.modules() if isinstance(conv, ConvertedModule) for gm in conv.graph_modules
            for st in gm.modules() if isinstance(st, ReversibleStack)]
