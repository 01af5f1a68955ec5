import torch
from torch import nn

from meft_fx import passes
from helpers import captured

aten = torch.ops.aten


class ShapeFromInside(nn.Module):
    """Reads sizes off an intermediate tensor, the way attention code reshapes heads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        b, t, d = h.shape
        return h.reshape(b, t, 2, d // 2).sum(-2) + h[..., ::2]


def test_sizes_are_read_from_inputs():
    model = ShapeFromInside()
    x = torch.randn(3, 5, 8)
    gm, tensors = captured(model, (x,), prepare=False)
    gm = passes.hoist_shape_queries(gm)
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.target == aten.sym_size.int:
            assert n.args[0].op == "placeholder", n.format_node()
    for shape in [(3, 5, 8), (2, 9, 8), (4, 3, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(gm(x), model(x))
