"""Finding a model's output projection (the module whose output is the logits) for ``attach``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

USUAL_NAMES = ("lm_head", "output", "embed_out")
_MAX_LISTED = 12


@dataclass(frozen=True)
class Projection:
    """The module to hook, its dotted name (for messages) and its vocabulary size when known."""

    module: nn.Module
    name: str
    vocab_size: int | None


def find_projection(model: nn.Module, layer: nn.Module | str | object | None = None) -> Projection:
    """Resolve ``layer`` (module, dotted name or torchtune ``TiedLinear``), else guess the output projection.

    The guess tries the usual names (``lm_head``, ``output``, ``embed_out``), then the last
    ``nn.Linear`` whose ``out_features`` equals the input embedding's vocabulary.
    """
    if layer is None:
        found = _by_usual_name(model) or _by_vocab(model)
        if found is None:
            raise ValueError(
                f"could not find the output projection of {type(model).__name__}: no module named "
                f"{' / '.join(USUAL_NAMES)} and no nn.Linear whose out_features equals the input embedding's "
                f"vocabulary. {_candidates_hint(model)}"
            )
        return found
    if isinstance(layer, str):
        obj = _resolve_dotted(model, layer)
        return _as_projection(obj, layer, model)
    name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
    return _as_projection(layer, name, model)


def _as_projection(obj: object, name: str, model: nn.Module) -> Projection:
    inner = _tied_inner(obj)
    if inner is not None:
        weight = getattr(getattr(obj, "tied_module", None), "weight", None)
        return Projection(inner, f"{name}.linear", _rows(weight))
    if not isinstance(obj, nn.Module):
        raise TypeError(
            f"layer {name!r} is a {type(obj).__name__}, not an nn.Module (nor a TiedLinear). {_candidates_hint(model)}"
        )
    return Projection(obj, name, _rows(getattr(obj, "weight", None)))


def _rows(weight: object) -> int | None:
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _resolve_dotted(model: nn.Module, dotted: str) -> object:
    obj: object = model
    for part in dotted.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model has no attribute {dotted!r} (missing {part!r}). {_candidates_hint(model)}")
        obj = getattr(obj, part)
    return obj


def _tied_inner(obj: object) -> nn.Module | None:
    """The ``.linear`` module of a torchtune ``TiedLinear`` (a plain class, not an nn.Module), else None."""
    inner = getattr(obj, "linear", None)
    return inner if not isinstance(obj, nn.Module) and isinstance(inner, nn.Module) else None


def _by_usual_name(model: nn.Module) -> Projection | None:
    # shallowest first: the model's own ``output`` beats a nested ``attn.output``
    for prefix, module in sorted(model.named_modules(), key=lambda nm: nm[0].count(".") if nm[0] else -1):
        for attr in USUAL_NAMES:
            obj = getattr(module, attr, None)
            if isinstance(obj, nn.Module) or _tied_inner(obj) is not None:
                return _as_projection(obj, f"{prefix}.{attr}" if prefix else attr, model)
    return None


def _input_vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return None if emb is None else emb.num_embeddings


def _by_vocab(model: nn.Module) -> Projection | None:
    vocab = _input_vocab(model)
    if vocab is None:
        return None
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return Projection(hits[-1][1], hits[-1][0], vocab) if hits else None


def _candidates_hint(model: nn.Module) -> str:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    linears.sort(key=lambda nm: -nm[1].out_features)
    listed = ", ".join(f"{n} ({m.in_features}->{m.out_features})" for n, m in linears[:_MAX_LISTED])
    example = linears[0][0] if linears else "lm_head"
    return (
        f"Candidate nn.Linear modules (largest out_features first): {listed or 'none'}. "
        f'Pass the projection explicitly: agent_obs.attach(model, layer="{example}") or layer=model.{example}.'
    )
