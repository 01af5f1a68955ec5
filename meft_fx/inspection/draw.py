"""`draw`: a picture of a converted model's reversible stack(s), made with matplotlib alone.

One column per stack, read bottom to top. The two streams are the vertical lines h1 (left) and
h2 (right); both start as the stack's input. Each coupling is one band: F reads h2 and adds into
h1 (h1 ← λ·h1 + F(h2), arrow right to left), then G reads the new h1 and adds into h2
(h2 ← β·h2 + G(h1), arrow left to right); MEFT1/2 then swap the streams (the lines cross). Box
colour says what F and G are (attention, FFN, a whole pretrained layer, or a lone adapter), the
green tag marks the adapters inside, "ctx" marks a block that reads context (masks, sizes...).
Left of the band: the coupling index and source layer; right: the activation memory it saves per
token. At the top, the stream the stack returns.
"""
from __future__ import annotations

import os
from typing import NamedTuple

from .explain import format_bytes
from .networkx_view import to_networkx

COLORS = {"attention": "#cfe2ff", "ffn": "#ffe2c4", "layer": "#e3d7f7", "adapter": "#d3f2d3", "none": "#f3f3f3",
          "other": "#eeeeee"}
EDGE = {"attention": "#3d6fb6", "ffn": "#c47a2c", "layer": "#7a57b8", "adapter": "#3c9a3c", "none": "#9a9a9a",
        "other": "#777777"}
H1_X, H2_X, BOX_L, BOX_R = 1.0, 9.0, 2.3, 7.7
BAND = 2.0                                 # height of one coupling
COL_W = 17.0                               # width of one stack's column (data units)


def _kind(blocks) -> str:
    kinds = [k for _, k in blocks]
    if kinds and all(k == "adapter" for k in kinds):
        # ("adapter", "adapter") is an adapter; another label (MEFT1's top G: "none (...)") adds nothing
        return "adapter" if any(m == "adapter" for m, _ in blocks) else "none"
    kinds = [k for k in kinds if k != "adapter"]
    if "attention" in kinds and "ffn" in kinds:
        return "layer"
    return kinds[0] if kinds and kinds[0] in COLORS else "other"


def _describe(blocks, layer: str) -> tuple:
    """(title, module line) of F or G."""
    kind = _kind(blocks)
    title = {"attention": "attention", "ffn": "FFN", "layer": "whole layer", "adapter": "adapter only",
             "none": "no update"}.get(kind, kind)
    mods = []
    for m, k in blocks:
        if k == "adapter":
            if m != "adapter":
                mods.append(m)
            continue
        rel = m[len(layer) + 1:] if layer and m.startswith(layer + ".") else m
        mods.append(rel or "?")
    line = ", ".join(mods)
    if len(line) > 44:
        line = line[:41] + "..."
    return title, line


def _fmt(n) -> str:
    return format_bytes(n)


def draw(model, path: str, *, title: str | None = None, estimate_memory: bool = True, dpi: int = 110):
    """Write a picture of the converted `model` to `path`; the extension picks the format.

    `.svg` (text stays text, so labels are searchable) and `.png` are supported, as is any
    other format matplotlib writes (`.pdf`). Returns `path`. See this module's docstring for how
    to read the picture. Needs matplotlib (`pip install matplotlib`, or the `examples` extra).
    """
    plt, patches = _import_matplotlib()
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if not ext:
        raise ValueError(f"draw: {path!r} has no extension; use .svg or .png")
    g = to_networkx(model, estimate_memory=estimate_memory)
    columns = _columns(g)

    n_max = max(len(c[2]) for c in columns)
    height_units = n_max * BAND + 5.9
    width_units = COL_W * len(columns)
    unit = 0.62                                                      # inches per data unit
    fig_w, fig_h = width_units * unit, height_units * unit
    rc = {"svg.fonttype": "none", "font.size": 9, "font.family": "DejaVu Sans"}
    with plt.rc_context(rc):
        fig = plt.figure(figsize=(fig_w, fig_h))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(-4.5, width_units - 4.5)
        ax.set_ylim(-2.9, n_max * BAND + 3.0)
        ax.axis("off")
        painter = _Painter(ax, patches)
        for ci, column in enumerate(columns):
            painter.column(ci, column, len(columns))
        cs = [c for col in columns for c in col[2]]
        painter.header(g, cs, title, n_max)
        painter.legend(cs, fig_h)
        kwargs = {"dpi": dpi} if ext not in ("svg", "pdf") else {}
        fig.savefig(path, format=ext, **kwargs)
        plt.close(fig)
    return path


def _import_matplotlib() -> tuple:
    """(pyplot, (Circle, FancyArrowPatch, FancyBboxPatch, Patch)), on the Agg backend unless one is already chosen."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Patch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("meft_fx.draw needs matplotlib: pip install matplotlib") from e
    return plt, (Circle, FancyArrowPatch, FancyBboxPatch, Patch)


def _columns(g) -> list:
    """One (stack path, input node, coupling nodes, output node, context nodes) per stack of the graph `g`."""
    stacks = {}
    for node, d in g.nodes(data=True):
        if d["kind"] == "stream_input":
            stacks[d["stack"]] = node
    columns = []
    for spath, inp in stacks.items():
        chain, cur = [], inp
        while True:
            nxt = [v for v in g.successors(cur) if g.edges[cur, v]["kind"] == "stream"]
            if not nxt:
                break
            cur = nxt[0]
            chain.append(cur)
        couplings = [g.nodes[c] for c in chain if g.nodes[c]["kind"] == "coupling"]
        outp = g.nodes[chain[-1]] if chain and g.nodes[chain[-1]]["kind"] == "stream_output" else {"stream": "h2"}
        ctx = [g.nodes[u] for u in g.nodes if g.nodes[u]["kind"] == "context" and g.nodes[u]["stack"] == spath]
        columns.append((spath, g.nodes[inp], couplings, outp, ctx))
    return columns


class _X(NamedTuple):
    """x positions in one stack's column: the streams h1 and h2, the left and right edges of the boxes."""

    h1x: float
    h2x: float
    bl: float
    br: float

    @classmethod
    def of_column(cls, ci: int) -> "_X":
        """The positions in column `ci`."""
        ox = ci * COL_W
        return cls(ox + H1_X, ox + H2_X, ox + BOX_L, ox + BOX_R)


class _Painter:
    """Draws the parts of the picture onto one matplotlib Axes."""

    def __init__(self, ax, patches: tuple):
        """Draw on `ax` with the patch classes `patches` = (Circle, FancyArrowPatch, FancyBboxPatch, Patch)."""
        self.ax = ax
        self.Circle, self.FancyArrowPatch, self.FancyBboxPatch, self.Patch = patches

    def arrow(self, x0, y0, x1, y1, color="#333333", style="-|>", lw=1.2, ls="-"):
        """An arrow from (x0, y0) to (x1, y1); a plain line with `style="-"`."""
        self.ax.add_patch(self.FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=10, color=color,
                                               lw=lw, linestyle=ls, shrinkA=0, shrinkB=0))

    def plus(self, x, y):
        """The circled "+" where a block's output is added into a stream."""
        ax = self.ax
        ax.add_patch(self.Circle((x, y), 0.22, facecolor="white", edgecolor="#222222", lw=1.2, zorder=4))
        ax.text(x, y, "+", ha="center", va="center", fontsize=11, zorder=5, fontweight="bold")

    def column(self, ci: int, column: tuple, n_columns: int) -> None:
        """Draw the stack `column` (an item of `_columns`) as column `ci` of `n_columns`."""
        spath, inp, couplings, outp, ctx = column
        x = _X.of_column(ci)
        top = len(couplings) * BAND
        self._input(x, inp)
        self._streams(x, couplings, top)
        for k, c in enumerate(couplings):
            self._coupling(x, k * BAND, c)
        self._output(x, outp, top)
        self._context(x, ctx)
        if n_columns > 1:
            self.ax.text((x.h1x + x.h2x) / 2, top + 1.65, inp.get("owner") or spath, ha="center", va="center",
                         fontsize=10, fontweight="bold", color="#333333")

    def _input(self, x: _X, inp: dict) -> None:
        """The stack's input box at the bottom, feeding both streams, and the h1 / h2 labels."""
        ax, arrow = self.ax, self.arrow
        h1x, h2x, bl, br = x
        ax.add_patch(self.FancyBboxPatch((bl, -2.05), br - bl, 0.7, boxstyle="round,pad=0.05", facecolor="#f4f4f4",
                                         edgecolor="#555555"))
        ax.text((bl + br) / 2, -1.55, f"{inp.get('owner') or 'stack'} input ({inp.get('node', '')})", ha="center",
                va="center", fontsize=8.5)
        ax.text((bl + br) / 2, -1.85, "h1 = h2 = input", ha="center", va="center", fontsize=8.5)
        arrow(bl, -1.7, h1x, -1.7, style="-")
        arrow(h1x, -1.7, h1x, -0.2)
        arrow(br, -1.7, h2x, -1.7, style="-")
        arrow(h2x, -1.7, h2x, -0.2)
        ax.text(h1x - 0.15, -0.55, "h1", ha="right", va="center", fontsize=10, fontweight="bold", color="#444444")
        ax.text(h2x + 0.15, -0.55, "h2", ha="left", va="center", fontsize=10, fontweight="bold", color="#444444")

    def _streams(self, x: _X, couplings: list, top: float) -> None:
        """The two vertical stream lines up to `top`, crossing over where a coupling swaps them."""
        ax = self.ax
        h1x, h2x = x.h1x, x.h2x
        y = -0.2
        for k, c in enumerate(couplings):
            y0 = k * BAND
            end = y0 + (1.62 if c["swap"] else BAND)
            ax.plot([h1x, h1x], [y, end], color="#222222", lw=1.6, zorder=1)
            ax.plot([h2x, h2x], [y, end], color="#222222", lw=1.6, zorder=1)
            if c["swap"]:
                ax.plot([h1x, h2x], [end, y0 + BAND], color="#222222", lw=1.2, zorder=1)
                ax.plot([h2x, h1x], [end, y0 + BAND], color="#222222", lw=1.2, zorder=1)
                ax.text((h1x + h2x) / 2, y0 + 1.81, "swap", ha="center", va="center", fontsize=7, color="#666666",
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
            y = y0 + BAND
        ax.plot([h1x, h1x], [y, top + 0.35], color="#222222", lw=1.6, zorder=1)
        ax.plot([h2x, h2x], [y, top + 0.35], color="#222222", lw=1.6, zorder=1)

    def _coupling(self, x: _X, y0: float, c: dict) -> None:
        """One coupling's band from `y0`: its index and layer on the left, memory saved on the right, F and G."""
        ax = self.ax
        h1x, h2x = x.h1x, x.h2x
        layer = c.get("layer", "")
        short = ".".join(layer.split(".")[-2:]) if layer else "?"
        ax.text(h1x - 0.55, y0 + 0.95, f"coupling {c['index']}", ha="right", va="bottom", fontsize=9.5,
                fontweight="bold")
        ax.text(h1x - 0.55, y0 + 0.9, short, ha="right", va="top", fontsize=8, color="#555555")
        saved = c.get("activation_bytes_saved_per_token")
        if saved is not None:
            ax.text(h2x + 0.55, y0 + 0.95, f"saves {_fmt(saved)}", ha="left", va="bottom", fontsize=8, color="#2d6a2d")
            ax.text(h2x + 0.55, y0 + 0.9, "per token", ha="left", va="top", fontsize=8, color="#2d6a2d")
        for half, yc, src_x, dst_x, scale in (("F", y0 + 0.5, h2x, h1x, c["lam"]), ("G", y0 + 1.3, h1x, h2x, c["beta"])):
            self._half(x, c, half, yc, src_x, dst_x, scale, layer)

    def _half(self, x: _X, c: dict, half: str, yc: float, src_x: float, dst_x: float, scale: float,
              layer: str) -> None:
        """The box of `half` ("F" or "G") of coupling `c` at height `yc`, reading the stream at `src_x` into `dst_x`."""
        ax = self.ax
        bl, br = x.bl, x.br
        blocks = c[half]
        kind = _kind(blocks)
        title_, line = _describe(blocks, layer)
        bh = 0.6
        ax.add_patch(self.FancyBboxPatch((bl, yc - bh / 2), br - bl, bh, boxstyle="round,pad=0.03",
                                         facecolor=COLORS[kind], edgecolor=EDGE[kind], lw=1.1, zorder=2))
        ax.text(bl + 0.15, yc + 0.12, f"{half}: {title_}", ha="left", va="center", fontsize=9, fontweight="bold",
                zorder=3)
        if line:
            ax.text(bl + 0.15, yc - 0.14, line, ha="left", va="center", fontsize=7.5, color="#333333", zorder=3)
        ads = c["adapters"].get(half, [])
        if ads and kind != "adapter":
            label = "+ adapter" if len(ads) == 1 else f"+ {len(ads)} adapters"
            ax.text(br - 0.12, yc + 0.12, label, ha="right", va="center", fontsize=7.5, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.2", facecolor=COLORS["adapter"], edgecolor=EDGE["adapter"], lw=0.8))
        if c.get("f_context" if half == "F" else "g_context"):
            ax.text(br - 0.12, yc - 0.15, "ctx", ha="right", va="center", fontsize=6.5, style="italic",
                    color="#666666", zorder=3)
        self._update(x, half, kind, yc, src_x, dst_x, scale)

    def _update(self, x: _X, half: str, kind: str, yc: float, src_x: float, dst_x: float, scale: float) -> None:
        """The arrows of one half: reads the stream at `src_x`, adds into the one at `dst_x` (scaled by λ or β)."""
        arrow = self.arrow
        bl, br = x.bl, x.br
        if src_x > dst_x:
            arrow(src_x, yc, br, yc, color=EDGE[kind])
            arrow(bl, yc, dst_x + 0.22, yc, color=EDGE[kind])
        else:
            arrow(src_x, yc, bl, yc, color=EDGE[kind])
            arrow(br, yc, dst_x - 0.22, yc, color=EDGE[kind])
        self.plus(dst_x, yc)
        sym = "λ" if half == "F" else "β"
        if scale != 1.0:
            self.ax.text(dst_x + (0.3 if dst_x == x.h1x else -0.3), yc - 0.33, f"×{sym}={scale:g}",
                         ha="left" if dst_x == x.h1x else "right", va="center", fontsize=7, color="#444444")

    def _output(self, x: _X, outp: dict, top: float) -> None:
        """The stack's output box at `top`, fed by the stream(s) it returns; the other one is marked dropped."""
        ax, arrow = self.ax, self.arrow
        h1x, h2x, bl, br = x
        out_stream = outp.get("stream", "h2")
        ax.add_patch(self.FancyBboxPatch((bl, top + 0.6), br - bl, 0.7, boxstyle="round,pad=0.05", facecolor="#f4f4f4",
                                         edgecolor="#555555"))
        desc = {"h1": "stream h1", "h2": "stream h2", "mean": "(h1 + h2) / 2"}.get(out_stream, out_stream)
        ax.text((bl + br) / 2, top + 0.95, f"stack output = {desc}", ha="center", va="center")
        if out_stream in ("h1", "mean"):
            arrow(h1x, top + 0.35, h1x, top + 0.95, style="-")
            arrow(h1x, top + 0.95, bl, top + 0.95)
        if out_stream in ("h2", "mean"):
            arrow(h2x, top + 0.35, h2x, top + 0.95, style="-")
            arrow(h2x, top + 0.95, br, top + 0.95)
        if out_stream != "mean":
            other = h1x if out_stream == "h2" else h2x
            ax.text(other, top + 0.45, "(dropped)", ha="center", va="bottom", fontsize=7, color="#888888")

    def _context(self, x: _X, ctx: list) -> None:
        """The line under the column naming the context values every layer reads."""
        ctx_names = ", ".join(d.get("node", "") for d in ctx)
        if len(ctx_names) > 70:
            ctx_names = ctx_names[:67] + "..."
        self.ax.text((x.h1x + x.h2x) / 2, -2.55, f"context read by every layer: {ctx_names or 'none'}", ha="center",
                     va="center", fontsize=7.5, color="#555555", style="italic")

    def header(self, g, cs: list, title: str | None, n_max: int) -> None:
        """The title (`title`, or a summary of the model and its couplings `cs`) and how to read the picture."""
        ax = self.ax
        lams = sorted({c["lam"] for c in cs})
        betas = sorted({c["beta"] for c in cs})
        head = title or (f"{g.graph.get('model', '')}: {g.graph.get('method', '').upper()}, {len(cs)} couplings, "
                         f"λ={'/'.join(f'{v:g}' for v in lams)}, β={'/'.join(f'{v:g}' for v in betas)}, "
                         f"numerics {g.graph.get('numerics', '')}")
        ax.text(-4.3, n_max * BAND + 2.65, head, ha="left", va="center", fontsize=11, fontweight="bold")
        ax.text(-4.3, n_max * BAND + 2.2, "read bottom to top:  h1 ← λ·h1 + F(h2),  then  h2 ← β·h2 + G(h1)",
                ha="left", va="center", fontsize=8.5, color="#444444")

    def legend(self, cs: list, fig_h: float) -> None:
        """The colour legend of the block kinds used by the couplings `cs` (always listing the adapter)."""
        Patch = self.Patch
        used = {_kind(c[h]) for c in cs for h in ("F", "G")}
        names = {"attention": "attention sub-block", "ffn": "FFN sub-block", "layer": "whole pretrained layer",
                 "adapter": "adapter (trainable)", "none": "no update (adds 0)", "other": "other"}
        handles = [Patch(facecolor=COLORS[k], edgecolor=EDGE[k], label=names[k]) for k in COLORS if k in used]
        if "adapter" not in used:
            handles.append(Patch(facecolor=COLORS["adapter"], edgecolor=EDGE["adapter"], label="adapter (trainable)"))
        self.ax.legend(handles=handles, loc="upper right", fontsize=8, frameon=False,
                       bbox_to_anchor=(1.0, 1.0 - 0.15 / max(fig_h, 1)))


__all__ = ["draw"]
