"""`python -m meft_fx inspect PATH_OR_NAME`: convert a model and show what the pass did."""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Convert a transformers model with meft_fx and show what the compiler pass did.

PATH_OR_NAME is either a local transformers model folder (config.json + weights), loaded with the
class named in its config's "architectures" (or --auto-class), or the name of a transformers model
class such as LlamaForCausalLM or BertForSequenceClassification, built with random weights from a
tiny configuration of its config class (hidden size 32, 4 heads, --layers layers, small vocab).

By default it prints the explanation: one row per reversible coupling (source layer, F and G
blocks, lambda, beta, swap, activation bytes saved per token) and every region not rewritten with
the reason. --graph, --list-graphs and --debug-node print only what they ask for; --draw adds a
picture to whatever is printed.
"""

EPILOG = """\
graph names (--list-graphs shows them all): captured, then one per transform of the pass pipeline
(meft_fx.passes.PIPELINE), final, and per coupling coupling{i}/forward, coupling{i}/inverse,
coupling{i}/backward (the generated programs the runtime runs), coupling{i}/F, coupling{i}/G; with
several converted modules they are prefixed by the module path and "/". A unique suffix is enough:
--graph coupling3/inverse.

examples:
  python -m meft_fx inspect /path/to/all-MiniLM-L6-v2
  python -m meft_fx inspect LlamaForCausalLM --layers 4 --method meft1 --draw llama.svg
  python -m meft_fx inspect BertModel --graph coupling0/inverse
  python -m meft_fx inspect BertModel --debug-node add_3

exit status: 0 success, 1 the model could not be loaded or converted (the error names the node or
field, the pass and what to do), 2 bad arguments (including an unknown graph name).
"""

TINY = {
    # sizes every tiny config gets where its config class has the field
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "dim": 32, "word_embed_proj_dim": 32, "embed_dim": 32,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 8, "d_kv": 8,
    "intermediate_size": 64, "ffn_dim": 64, "d_ff": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "hidden_dim": 64,
    "max_position_embeddings": 128, "n_positions": 128,
    "image_size": 32, "patch_size": 8,
}
LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
                "num_decoder_layers")
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")


def tiny_config(config_class, layers: int = 2):
    """A small configuration of `config_class`: the TINY sizes and `layers` layers, where it has them."""
    default = config_class()
    kw = {k: v for k, v in TINY.items() if hasattr(default, k) and getattr(default, k) is not None
          or k in ("num_key_value_heads",) and hasattr(default, k)}
    kw.update({k: layers for k in LAYER_FIELDS if hasattr(default, k)})
    if hasattr(default, "vocab_size"):
        ids = [getattr(default, k, None) for k in TOKEN_FIELDS]
        ids = [i for i in ids if isinstance(i, int)]
        kw["vocab_size"] = max([128] + [i + 1 for i in ids])
    return config_class(**kw)


def load_model(spec: str, layers: int = 2, auto_class: str | None = None):
    """(model, description) for a local folder or a transformers class name."""
    import torch
    import transformers

    if os.path.isdir(spec):
        cfg = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
        name = auto_class or next((a for a in (getattr(cfg, "architectures", None) or []) if hasattr(transformers, a)),
                                  "AutoModel")
        cls = getattr(transformers, name, None)
        if cls is None:
            raise SystemExit(f"error: --auto-class {name!r} is not a transformers class")
        model = cls.from_pretrained(spec, local_files_only=True)
        return model, f"{type(model).__name__} from {spec}"
    cls = getattr(transformers, spec, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        if os.path.exists(spec) or os.sep in spec:
            raise SystemExit(f"error: {spec!r} is not a model folder (no such directory)")
        raise SystemExit(f"error: {spec!r} is neither a local model folder nor a transformers model class "
                         f"(e.g. BertForSequenceClassification, LlamaForCausalLM)")
    torch.manual_seed(0)
    cfg = tiny_config(cls.config_class, layers)
    model = cls(cfg)
    return model, f"{cls.__name__} with a tiny random {type(cfg).__name__} ({layers} layers)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m meft_fx` (its subcommands and their options)."""
    p = argparse.ArgumentParser(prog="python -m meft_fx", description="meft_fx: make pretrained transformers reversible (MEFT).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser("inspect", help="convert a model and explain the rewrite", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("model", metavar="PATH_OR_NAME", help="local transformers model folder, or a transformers model class name")
    q.add_argument("--method", choices=("auto", "meft1", "meft2", "meft3"), default="auto",
                   help="MEFT1: F = whole layer, G = adapter; MEFT2: the reverse; MEFT3: F = attention, G = FFN; "
                        "auto (default): MEFT1 for parallel-residual layers and for pre-norm layers with gated FFNs, "
                        "else MEFT3 (explain's second line says why)")
    q.add_argument("--lam", type=float, default=None, help="λ (scale on stream 1); default: the paper's value for the method")
    q.add_argument("--beta", type=float, default=None, help="β (scale on stream 2); default: the paper's value for the method")
    q.add_argument("--layers", type=int, default=2, help="layers of the tiny config when PATH_OR_NAME is a class name (default 2)")
    q.add_argument("--auto-class", default=None, metavar="CLASS",
                   help="transformers class to load a folder with (default: its config's architectures, else AutoModel)")
    q.add_argument("--draw", metavar="FILE", help="write a picture of the rewritten model; .svg or .png (by extension)")
    q.add_argument("--graph", metavar="NAME", action="append", default=[],
                   help="print the code of the named graph, headed by the pass that made it (repeatable)")
    q.add_argument("--list-graphs", action="store_true", help="list the names of every graph --graph can print")
    q.add_argument("--debug-node", metavar="NODE", action="append", default=[],
                   help="say why the named node (as printed by --graph dropout_to_modules) is or is not part of a "
                        "coupling: data or not, fan-out, post-dominator, residual stream, unit, coupling (repeatable)")
    q.add_argument("--no-memory", action="store_true", help="skip the activation-memory probe (faster)")
    q.add_argument("-v", "--verbose", action="store_true", help="print conversion progress to stderr")
    return p


def _inspect(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import meft_fx
    from meft_fx import ConversionError, MEFTConfig
    from meft_fx.inspection.debug_node import debug_node

    try:
        config = MEFTConfig(method=args.method, lam=args.lam, beta=args.beta, verbose=args.verbose)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.verbose:
        _disable_progress_bars()
    try:
        model, desc = load_model(args.model, args.layers, args.auto_class)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a loading failure is reported, not a traceback
        print(f"error: could not load {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        rev = meft_fx.convert(model, config)
    except (ConversionError, ValueError, TypeError) as e:
        print(f"error: {desc}: conversion failed ({type(e).__name__}):\n{e}", file=sys.stderr)
        for node in args.debug_node:
            print(debug_node(model, node))
        return 1
    actions = bool(args.graph or args.list_graphs or args.debug_node)
    status = 0
    if args.list_graphs or args.graph:
        status = _print_graphs(rev, args.list_graphs, args.graph)
    _print_debug_nodes(rev, model, args.debug_node)
    if not actions:
        print(desc)
        print(meft_fx.explain(rev, estimate_memory=not args.no_memory))
    if args.draw and not _draw(rev, args.draw, args.no_memory):
        return 2
    return status


def _disable_progress_bars() -> None:
    """Turn off transformers' download/loading progress bars, if transformers allows it."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass


def _print_graphs(rev, list_graphs: bool, names) -> int:
    """Print the graph names (with `list_graphs`) and each named graph; 2 when a name is unknown, else 0."""
    from meft_fx.inspection.graphs import find_graph, format_program, graphs

    status = 0
    progs = graphs(rev)
    if list_graphs:
        for name, gm in progs.items():
            print(f"{name:32s} made by {gm.meta.get('meft_pass', '?')}")
    for name in names:
        try:
            full, gm = find_graph(progs, name)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            status = 2
            continue
        print(format_program(full, gm))
    return status


def _print_debug_nodes(rev, model, nodes) -> None:
    """Print debug_node's report for each node, looking in the whole model when it is outside the converted part."""
    from meft_fx.inspection.debug_node import debug_node

    for node in nodes:
        rep = debug_node(rev, node)
        if not rep.found:  # outside the converted module(s): look in the whole model
            whole = debug_node(model, node)
            rep = whole if whole.found else rep
        print(rep)


def _draw(rev, path: str, no_memory: bool) -> bool:
    """Write the picture to `path` and say so; False (with the error on stderr) when it cannot be drawn."""
    import meft_fx

    try:
        meft_fx.draw(rev, path, estimate_memory=not no_memory)
    except (ValueError, ImportError) as e:
        print(f"error: --draw {path}: {e}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


def main(argv=None) -> int:
    """`python -m meft_fx COMMAND ...`: run the command given in `argv` (default: sys.argv); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    return 2  # pragma: no cover - argparse rejects other commands
