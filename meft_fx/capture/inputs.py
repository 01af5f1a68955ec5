"""Example inputs for a capture: the caller's (normalised) or a transformers model's own dummy inputs."""
from __future__ import annotations

import inspect

import torch


def is_transformers_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _forward_params(model) -> dict:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def default_inputs(model) -> dict:
    """Example inputs for a transformers model that was given none (its dummy inputs, cleaned up).

    `dummy_inputs` is not always right for the model (ViT's are token ids, T5EncoderModel's include
    decoder inputs): keys the forward does not take are dropped, image models get `pixel_values`
    from their config, and an `attention_mask` is added where the forward takes one.
    """
    params = _forward_params(model)
    cfg = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    out = {}
    if main == "pixel_values":
        c = getattr(cfg, "num_channels", 3)
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        g = torch.Generator().manual_seed(0)
        out["pixel_values"] = torch.randn(2, c, size, size, generator=g).to(dtype)
        return out
    try:
        dummy = dict(model.dummy_inputs)
    except Exception:
        vocab = getattr(cfg, "vocab_size", 100) or 100
        dummy = {"input_ids": torch.tensor([[7, 6, 0, 0, 1], [1, 2, 3, 0, 0], [0, 0, 0, 4, 5]]) % vocab}
    for k, v in dummy.items():
        if k in params:
            out[k] = v
    if "input_ids" in out and "attention_mask" in params and "attention_mask" not in out:
        # Padded like a real batch: some models skip the mask when it is all ones, and a first capture
        # without a mask would be captured again at the first padded batch.
        mask = torch.ones_like(out["input_ids"])
        mask[-1, -1:] = 0
        out["attention_mask"] = mask
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params and "decoder_input_ids" not in out:
        ids = out["input_ids"]
        out["decoder_input_ids"] = ids[:, :-1].clone() if ids.shape[1] > 2 else ids.clone()
    if not out:
        raise ValueError(f"{type(model).__name__}: could not build example inputs from dummy_inputs; pass example_inputs=")
    return out


def normalize_inputs(model, example_inputs) -> tuple[tuple, dict]:
    """Accept a dict (keyword arguments), a tuple/list (positional), a single tensor, or None."""
    if example_inputs is None:
        if is_transformers_model(model):
            return (), default_inputs(model)
        raise ValueError(f"{type(model).__name__} is not a transformers model: pass example_inputs= "
                         "(a dict of keyword arguments or a tuple of positional arguments for its forward)")
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys") and hasattr(example_inputs, "items"):
        return (), dict(example_inputs.items())
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    raise TypeError(f"example_inputs must be a dict, a tuple, a tensor or None, got {type(example_inputs).__name__}")
