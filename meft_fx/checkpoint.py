"""Adapters on disk: `save_adapters(model, folder)` and `load_adapters(model, folder)`.

    rev = meft_fx.convert(base)                  # ... train rev ...
    meft_fx.save_adapters(rev, "out/")           # a few hundred KB, not the whole model
    rev2 = meft_fx.convert(base_again)           # the same base model, the same MEFTConfig
    meft_fx.load_adapters(rev2, "out/")          # rev2 now predicts exactly like rev

A folder holds two files:

- `meft_adapters.safetensors`: every parameter that required grad when it was saved (all adapters,
  plus a fresh task head such as `classifier.*` when `MEFTConfig.train_head`), under its name in
  `model.named_parameters()`. Names like `bert.encoder.graph_module.meft_stack.couplings.0.F.meft_adapter_0_attn0.up.weight`
  are stable: two conversions of the same model with the same config give the same names.
- `meft_adapters.json`: method, λ, β, numerics, adapter rank, the full `MEFTConfig.to_dict()`, the
  base model's identity (class, `config.name_or_path`, and a fingerprint of every parameter that was
  *not* saved — the frozen pretrained weights, under their names in the unconverted model: shape,
  dtype and a hash of up to 4096 evenly spaced elements per tensor), and the names, shapes and
  dtypes of the saved parameters.

`load_adapters` checks, before touching the model, that it was converted with the same network
(method, λ, β and the stream swap, rank, adapter activation, output stream, numerics), that its
frozen weights have the same fingerprint, that every saved name exists with the same shape, and
that every parameter the model trains is in the folder; otherwise it raises
`meft_fx.errors.AdapterMismatchError` (a `ValueError`) listing every difference. Fields that do
not change what the saved weights compute (dropout rate, init std, `reversible`, `capture`,
`inplace`, `verbose`) may differ. `config.name_or_path` is recorded for people, not compared: the
same checkpoint loaded from another folder is the same model; the fingerprint decides.

Multi-process: with DistributedDataParallel call `save_adapters(ddp_model, folder)` on one rank
(the wrapper is unwrapped). With FSDP2 (`fully_shard` on the whole converted model) every rank
must call it (the shards are gathered; rank 0 writes); load adapters before sharding.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import MEFTConfig
from .runtime.fixed_point import DEFAULT_FRAC_BITS
from .errors import AdapterMismatchError

__all__ = ["save_adapters", "load_adapters", "adapter_config", "save_pretrained", "WEIGHTS_NAME", "CONFIG_NAME",
           "NETWORK_FIELDS"]

WEIGHTS_NAME = "meft_adapters.safetensors"
CONFIG_NAME = "meft_adapters.json"
FORMAT = "meft_fx.adapters"
FORMAT_VERSION = 1
SAMPLE = 4096  # elements hashed per frozen tensor
# MEFTConfig fields that change what the saved weights compute; the others may differ at load time.
NETWORK_FIELDS = ("method", "adapter_rank", "adapter_activation", "output", "numerics", "frac_bits",
                  "stream_bits", "modules_to_save", "leak_compensation")
# What a field was before it existed (folders saved by older versions lack it).
NETWORK_DEFAULTS = {"frac_bits": DEFAULT_FRAC_BITS, "stream_bits": 64, "modules_to_save": [],
                    "leak_compensation": False}


def _class_name(model: nn.Module) -> str:
    """The model's class, not the subclass FSDP2's `fully_shard` swaps in (FSDPBertFor... -> BertFor...)."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls.__name__
    return type(model).__name__


def _unwrap(model: nn.Module) -> nn.Module:
    """The converted model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
    return model


def _meft_config(model: nn.Module, what: str) -> MEFTConfig:
    config = getattr(model, "meft_config", None)
    if not isinstance(config, MEFTConfig):
        raise ValueError(f"{what}: {type(model).__name__} was not converted by meft_fx.convert (it has no "
                         f"`meft_config`); convert the base model first, then {what.split('(')[0]} it")
    return config


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter (a collective: every rank must call), else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _tensor_digest(t: torch.Tensor) -> str:
    t = _full(t.detach())
    flat = t.reshape(-1)
    n = flat.numel()
    if n > SAMPLE:
        # float32 positions, as folders saved before were hashed; rounded up to n past 2^24 elements: clamped
        flat = flat[torch.linspace(0, n - 1, SAMPLE, device=flat.device).long().clamp_(max=n - 1)]
    data = flat.contiguous().cpu()
    if data.numel():
        data = data.view(torch.uint8)
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()[:16]


def _base_tensors(model: nn.Module, exclude) -> dict:
    """{name in the unconverted model: tensor} for every parameter of `model` whose name is not in
    `exclude` (the saved, trained ones).

    A pretrained weight inside a `ConvertedModule` is reachable under its rewritten path (say
    `bert.encoder.graph_module.meft_stack.couplings.0.F.mod.layer.0.attention.self.query.weight`,
    which depends on the method); it is fingerprinted under its original path
    (`bert.encoder.layer.0.attention.self.query.weight`), taken from the original module the
    ConvertedModule keeps, so the fingerprint names the base model's tensors whatever the MEFT
    configuration (and stays whole when FSDP2 shards the rewritten graph's parameters).
    """
    named = dict(model.named_parameters())
    excluded = {id(p) for n, p in named.items() if n in exclude}
    originals = {}  # rewritten parameter name -> (prefix, original module) of its ConvertedModule
    for path, mod in model.named_modules():
        original = mod.__dict__.get("_original") if hasattr(mod, "graph_module") else None  # a ConvertedModule
        if original is not None:
            prefix = f"{path}." if path else ""
            for n, _ in mod.named_parameters():
                originals[prefix + n] = (prefix, original)
    out, done = {}, set()
    for n, p in named.items():  # in model order; a converted module's originals where it starts
        if n in originals:
            prefix, original = originals[n]
            if id(original) not in done:
                done.add(id(original))
                out.update((prefix + k, q) for k, q in original.named_parameters() if id(q) not in excluded)
        elif n not in exclude:
            out[n] = p
    return out


def _fingerprint(model: nn.Module, exclude) -> dict:
    tensors = {name: [list(p.shape), str(p.dtype).replace("torch.", ""), _tensor_digest(p)]
               for name, p in _base_tensors(model, exclude).items()}
    overall = hashlib.sha256(json.dumps(sorted(tensors.items())).encode()).hexdigest()[:16]
    return {"digest": overall, "num_tensors": len(tensors),
            "num_elements": int(sum(_numel(v[0]) for v in tensors.values())), "tensors": tensors}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _identity(model: nn.Module, exclude) -> dict:
    cfg = getattr(model, "config", None)
    name = None
    if cfg is not None:
        name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None
    return {"class": _class_name(model),
            "model_type": getattr(cfg, "model_type", None) if cfg is not None else None,
            "name_or_path": str(name) if name else None,
            "fingerprint": _fingerprint(model, exclude)}


def _network(config: MEFTConfig) -> dict:
    lam, beta, swap = config.scales
    out = {k: list(v) if isinstance(v := getattr(config, k), tuple) else v for k in NETWORK_FIELDS}
    out.update(lam=lam, beta=beta, swap=swap)
    return out


def save_adapters(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write every trainable parameter of a converted model (adapters and a fresh task head) to
    `folder/meft_adapters.safetensors`, and `folder/meft_adapters.json` describing the MEFT
    configuration and the base model (see the module docstring). Creates `folder` if needed;
    overwrites a previous save there. Returns the folder as a Path.

    `model` is what `meft_fx.convert` returned, possibly wrapped in DistributedDataParallel or
    torch.compile, or sharded with FSDP2's `fully_shard` (then every rank must call this: the
    shards are gathered on all ranks and rank 0 writes). Raises ValueError when the model was not converted or nothing in it is trainable.
    """
    model = _unwrap(model)
    config = _meft_config(model, "save_adapters(model, folder)")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("save_adapters: no parameter of the model requires grad, so there is nothing to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from . import __version__
    lam, beta, _ = config.scales
    record = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "meft_fx_version": __version__,
        "method": config.method, "lam": lam, "beta": beta, "numerics": config.numerics,
        "adapter_rank": config.adapter_rank, "network": _network(config), "meft_config": config.to_dict(),
        "base_model": _identity(model, set(params)),
        "parameters": {n: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")} for n, p in params.items()},
        "num_parameters": int(sum(p.numel() for p in params.values())),
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }
    tensors = {n: _full(p.detach()).to("cpu").contiguous() for n, p in params.items()}
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_rank() != 0:
        return folder  # the gathers above were collective; rank 0 writes
    _write_folder(folder, tensors, record)
    return folder


#: The weights file HF's Trainer reads when resuming (`transformers.utils.SAFE_WEIGHTS_NAME`).
TRAINER_WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """What `save_pretrained` of a converted transformers model writes (so `trainer.save_model()` and
    every Trainer checkpoint): the `save_adapters` folder, plus `model.safetensors` holding the same
    trainable tensors, which `Trainer(resume_from_checkpoint=...)` loads into a fresh conversion.
    No `config.json`: a plain `from_pretrained(folder)` fails instead of loading a model with random
    layers; load with `meft_fx.from_pretrained(base_model, folder)`."""
    from safetensors.torch import save_file

    folder = save_adapters(model, folder)
    params = {n: _full(p.detach()).to("cpu").contiguous() for n, p in _unwrap(model).named_parameters()
              if p.requires_grad}
    tmp = folder / f".{TRAINER_WEIGHTS_NAME}.tmp"
    try:
        save_file(params, str(tmp), metadata={"format": "pt", "meft_fx": FORMAT})
        os.replace(tmp, folder / TRAINER_WEIGHTS_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return folder


def _write_folder(folder: Path, tensors: dict, record: dict) -> None:
    """Both files written to temporary names, the weights' SHA-256 recorded, then moved in place:
    an interrupted save leaves the previous save (or nothing), never half a file."""
    from safetensors.torch import save_file

    tmp_w, tmp_c = folder / f".{WEIGHTS_NAME}.tmp", folder / f".{CONFIG_NAME}.tmp"
    try:
        save_file(tensors, str(tmp_w), metadata={"format": "pt", "meft_fx": FORMAT})
        record["weights_sha256"] = _sha256(tmp_w)
        tmp_c.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        os.replace(tmp_w, folder / WEIGHTS_NAME)
        os.replace(tmp_c, folder / CONFIG_NAME)
    finally:
        for t in (tmp_w, tmp_c):
            t.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(pkg: str):
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001
        return None


def _read_record(folder: Path) -> dict:
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [p.name for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: no saved meft_fx adapters here (missing {', '.join(missing)}); "
                                f"write them with meft_fx.save_adapters(model, folder)")
    try:
        record = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a readable meft_fx adapter config ({type(e).__name__}: {e}); the file is "
                         f"damaged or truncated: save the adapters again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a meft_fx adapter config (format="
                         f"{record.get('format') if isinstance(record, dict) else type(record).__name__!r})")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {record['format_version']}, newer than this meft_fx "
                         f"reads ({FORMAT_VERSION}); upgrade meft_fx")
    return record


def adapter_config(folder: str | os.PathLike) -> MEFTConfig:
    """The MEFTConfig the adapters in `folder` were trained with, to convert the base model again:
    `meft_fx.load_adapters(meft_fx.convert(base, adapter_config(folder)), folder)`."""
    record = _read_record(Path(folder))
    cfg = {**NETWORK_DEFAULTS, **record["meft_config"]}
    known = set(MEFTConfig.__dataclass_fields__)
    return MEFTConfig(**{k: v for k, v in cfg.items() if k in known})


def _short(names, limit: int = 6) -> str:
    names = list(names)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_adapters(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Load adapters written by `save_adapters` into `model`, a fresh `meft_fx.convert` of the same
    base model with the same MEFT configuration. Copies the saved values into the model's
    parameters in place (keeping their dtype and device) and returns the model.

    Raises `meft_fx.errors.AdapterMismatchError` (a ValueError) naming every difference — another
    model class, other frozen weights, another method/λ/β/rank/numerics, missing or extra parameter
    names, other shapes — without changing the model; FileNotFoundError when `folder` holds no
    saved adapters; ValueError when `model` was not converted by meft_fx.
    """
    folder = Path(folder)
    record = _read_record(folder)
    model = _unwrap(model)
    config = _meft_config(model, "load_adapters(model, folder)")
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        raise ValueError("load_adapters: the model's parameters are sharded (torch.distributed.fsdp.fully_shard); "
                         "load the adapters into the converted model first, then shard it")
    problems = _load_problems(model, config, record)
    if problems:
        raise _mismatch_error(folder, record.get("base_model", {}), problems)
    tensors = _read_tensors(folder, record)
    _copy_saved(tensors, dict(model.named_parameters()), record.get("parameters", {}), folder)
    return model


def _read_tensors(folder: Path, record: dict) -> dict:
    """The saved tensors, after checking the file's SHA-256 against the one recorded at save time."""
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    want = record.get("weights_sha256")  # absent in folders saved before it was recorded
    if want is not None and _sha256(path) != want:
        raise AdapterMismatchError(f"load_adapters: {path} does not match the SHA-256 recorded in {CONFIG_NAME} "
                                   f"(the file was changed, damaged or truncated after saving); save the adapters "
                                   f"again. The model was not changed.")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterMismatchError(f"load_adapters: {path} cannot be read ({type(e).__name__}: {e}); the file is "
                                   f"damaged: save the adapters again. The model was not changed.") from None


def _load_problems(model: nn.Module, config: MEFTConfig, record: dict) -> list[str]:
    """Every reason the saved adapters in `record` do not fit `model` (empty when they do), in report order."""
    problems = _network_problems(record.get("network", {}), _network(config))

    base = record.get("base_model", {})
    if base.get("class") != _class_name(model):
        problems.append(f"model class: saved for {base.get('class')}, this is {_class_name(model)}")

    saved_params = record.get("parameters", {})
    named = dict(model.named_parameters())
    problems += _parameter_problems(named, saved_params)

    if base.get("class") == _class_name(model):
        problem = _fingerprint_problem(model, base, named, saved_params)
        if problem is not None:
            problems.append(problem)
    return problems


def _network_problems(saved_net: dict, net: dict) -> list[str]:
    """One line per network field (method, λ, β, swap, rank, ...) the model was converted with differently."""
    problems = []
    for k in sorted(set(saved_net) | set(net)):
        if saved_net.get(k, NETWORK_DEFAULTS.get(k)) != net.get(k):
            problems.append(f"MEFT config {k}: saved {saved_net.get(k)!r}, model converted with {net.get(k)!r}")
    return problems


def _parameter_problems(named: dict, saved_params: dict) -> list[str]:
    """Saved names missing from the model, saved shapes that differ, and trainable parameters not saved."""
    problems = []
    missing = [n for n in saved_params if n not in named]
    if missing:
        problems.append(f"{len(missing)} saved parameter(s) do not exist in this model: {_short(missing)}")
    shapes = [f"{n} saved {tuple(s['shape'])}, model {tuple(named[n].shape)}" for n, s in saved_params.items()
              if n in named and list(named[n].shape) != list(s["shape"])]
    if shapes:
        problems.append(f"{len(shapes)} parameter(s) have other shapes: {_short(shapes, 4)}")
    untrained = [n for n, p in named.items() if p.requires_grad and n not in saved_params]
    if untrained:
        problems.append(f"{len(untrained)} trainable parameter(s) of this model are not in the folder (they would keep "
                        f"their fresh initialisation): {_short(untrained)}")
    return problems


def _fingerprint_problem(model: nn.Module, base: dict, named: dict, saved_params: dict) -> str | None:
    """How the model's frozen weights differ from the saved base model's fingerprint, or None when they match."""
    trainable_now = {n for n, p in named.items() if p.requires_grad}
    fp_saved = base.get("fingerprint", {}).get("tensors", {})
    fp_now = _fingerprint(model, set(saved_params) | trainable_now)["tensors"]
    only_saved = [n for n in fp_saved if n not in fp_now and n not in trainable_now]
    only_now = [n for n in fp_now if n not in fp_saved]
    differ = [n for n in fp_saved if n in fp_now and fp_saved[n] != fp_now[n]]
    if not (only_saved or only_now or differ):
        return None
    if differ and not (only_saved or only_now) and all(
            fp_saved[n][1] != fp_now[n][1] and fp_saved[n][0] == fp_now[n][0] for n in differ):
        was, now = ("/".join(sorted({fp[n][1] for n in differ})) for fp in (fp_saved, fp_now))
        return (f"base model dtype: the adapters were trained on a {was} base, this model's frozen weights are {now} "
                f"({len(differ)} tensors; values cannot be compared across dtypes). Load into a conversion of the "
                f"{was} base, then cast the converted model (e.g. rev.to(torch.{now}))")
    where = base.get("name_or_path") or "an unnamed model"
    here = _identity(model, ()).get("name_or_path") or "an unnamed model"
    detail = []
    if differ:
        detail.append(f"{len(differ)} of {len(fp_saved)} frozen tensors differ ({_short(differ)})")
    if only_saved:
        detail.append(f"{len(only_saved)} frozen tensors of the saved base are missing here ({_short(only_saved)})")
    if only_now:
        detail.append(f"{len(only_now)} frozen tensors are new here ({_short(only_now)})")
    return (f"base model weights: the adapters were trained on {base.get('class')} from {where}, this "
            f"model ({_class_name(model)} from {here}) has other frozen weights: " + "; ".join(detail))


def _mismatch_error(folder: Path, base: dict, problems: list[str]) -> AdapterMismatchError:
    """The AdapterMismatchError listing `problems`, with how to convert the right model."""
    return AdapterMismatchError(
        f"load_adapters: the adapters in {folder} were saved for another model or MEFT configuration:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + f"\nConvert the same base model ({base.get('class')}, {base.get('name_or_path')}) with "
          f"meft_fx.checkpoint.adapter_config('{folder}') before loading.")


def _copy_saved(tensors: dict, named: dict, saved_params: dict, folder: Path) -> None:
    """Copy every saved tensor into the model's parameter of that name — all checked first, then all
    copied, so a mismatch leaves the model as it was."""
    absent = [n for n in saved_params if n not in tensors]
    if absent:
        raise AdapterMismatchError(f"load_adapters: {folder / WEIGHTS_NAME} lacks {len(absent)} tensor(s) listed in "
                                   f"{CONFIG_NAME}: {_short(absent)} (the folder is damaged; save again)")
    shapes = [f"{n} {tuple(tensors[n].shape)} in the file, {tuple(named[n].shape)} in the model" for n in saved_params
              if tuple(tensors[n].shape) != tuple(named[n].shape)]
    if shapes:
        raise AdapterMismatchError(f"load_adapters: {folder / WEIGHTS_NAME} disagrees with {CONFIG_NAME} on "
                                   f"{len(shapes)} shape(s): {_short(shapes, 4)} (the folder is damaged; save again). "
                                   f"The model was not changed.")
    with torch.no_grad():
        for n in saved_params:
            named[n].copy_(tensors[n])
