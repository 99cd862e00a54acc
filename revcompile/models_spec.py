"""Models named on the command line: ``timm:NAME``, ``torchvision:NAME``, ``hf:TYPE``, ``pkg.mod:fn``.

The CLI must build a model and one training call from a short name, offline: weights are
always random (``pretrained=False``, ``weights=None``, HuggingFace ``from_config``), and
``--config key=value`` overrides reach the model's constructor or config. Inputs are made
to fit each family: images of the model's own size for vision models, random token ids
for language models. Every mistake a user can make here (an unknown name, a config key the
model does not take, a module that does not import) is a ``SpecError`` with one line that
says what to do.

``device="meta"`` builds the model and its inputs on the meta device: shapes and dtypes
without storage, for predicting the memory of models this machine cannot hold
(``revcompile.predict``).
"""

from __future__ import annotations

import ast
import difflib
import importlib
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from revcompile.errors import one_line

__all__ = ["SpecError", "ModelSpec", "BuiltModel", "parse_spec", "parse_config", "build_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "reference-vit"
FAMILIES = ("timm", "torchvision", "hf")


class SpecError(ValueError):
    """The model spec or its options cannot be turned into a model."""


@dataclass(frozen=True)
class ModelSpec:
    family: str  # builtin | timm | torchvision | hf | callable
    name: str

    def __str__(self) -> str:
        return self.name if self.family in ("builtin", "callable") else f"{self.family}:{self.name}"


@dataclass(frozen=True)
class BuiltModel:
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    notes: tuple[str, ...] = ()  # what was changed or assumed to build it as asked


def parse_spec(text: str | None) -> ModelSpec:
    if text is None or text in (DEFAULT_MODEL, "builtin"):
        return ModelSpec("builtin", DEFAULT_MODEL)
    family, sep, name = text.partition(":")
    if sep and family in FAMILIES and name:
        return ModelSpec(family, name)
    if sep and family and name:
        return ModelSpec("callable", text)
    hint = ""
    if not sep:
        try:
            import timm

            hint = f" (for the timm model, write timm:{text})" if timm.is_model(text) else ""
        except ImportError:
            pass
    raise SpecError(
        f"cannot read the model {text!r}{hint}; use timm:NAME, torchvision:NAME, hf:MODEL_TYPE, "
        f"package.module:callable, or nothing for the built-in {DEFAULT_MODEL}"
    )


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def parse_config(items: list[str] | None) -> dict:
    """``["n_layer=24", "qkv_bias=false", "depths=2,2,6,2"]`` -> ``{"n_layer": 24, ...}``."""
    config = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"--config expects key=value with a Python name as key, got {item!r}")
        value = value.strip()
        if "," in value and not value.startswith(("(", "[")):  # depths=2,2,6,2
            config[key] = tuple(_value(v.strip()) for v in value.split(",") if v.strip())
        else:
            config[key] = _value(value)
    return config


def _describe_value(value) -> str:
    """What a callable returned, as a user would recognise it: ``a tuple of 3 (Tensor, Tensor, int)``."""
    if isinstance(value, (tuple, list)):
        kinds = ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} ({kinds})"
    if isinstance(value, type):
        return f"the class {value.__name__} (not an instance)"
    return f"a {type(value).__name__}" if value is not None else "None"


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _images(batch: int, channels: int, size) -> tuple:
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    return (torch.randn(batch, channels, height, width),)


def _construct(what: str, factory, config: dict):
    try:
        return factory(**config)
    except Exception as err:  # noqa: BLE001 -- a config key or value the model rejects
        if isinstance(err, TypeError) and config:
            raise SpecError(f"{what} does not accept this --config ({one_line(err, limit=200)})") from None
        meta = (" on the meta device (--predict-only): its constructor reads tensor values"
                if torch.get_default_device().type == "meta" else "")
        raise SpecError(f"cannot build {what}{' with this --config' if config else ''}{meta} ({one_line(err, limit=200)})") from None


def _builtin(config: dict, batch: int) -> BuiltModel:
    from revcompile.reference import ReferenceViT, example_inputs

    model = _construct("the built-in model", ReferenceViT, config)
    depth = len(model.blocks)
    return BuiltModel(model, example_inputs(model, batch_size=batch), {}, f"{DEFAULT_MODEL} (built-in ViT, depth {depth})")


def _timm(name: str, config: dict, batch: int, image_size: int | None) -> BuiltModel:
    import timm

    if not timm.is_model(name):
        raise SpecError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    model = _construct(f"timm model {name!r}", lambda **kw: timm.create_model(name, pretrained=False, **kw), config)
    size = image_size or config.get("img_size") or model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    channels = config.get("in_chans", model.pretrained_cfg.get("input_size", (3,))[0])
    return BuiltModel(model, _images(batch, channels, size), {}, f"timm:{name}")


def _torchvision(name: str, config: dict, batch: int, image_size: int | None) -> BuiltModel:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise SpecError(f"unknown torchvision model {name!r}{_suggest(name, known)}")
    model = _construct(f"torchvision model {name!r}",
                       lambda **kw: torchvision.models.get_model(name, weights=None, **kw), config)
    size = image_size or config.get("image_size") or getattr(model, "image_size", None) or 224
    return BuiltModel(model, _images(batch, 3, size), {}, f"torchvision:{name}")


_POSITION_LIMITS = ("max_position_embeddings", "n_positions")


def _fit_positions(hf_config, config: dict, seq_len: int | None) -> tuple[int, tuple[str, ...]]:
    """Tokens per sample: ``seq_len`` as asked, else 128; capped by the config's positions unless asked for.

    An explicit ``--seq-len`` beyond the config's position limit raises the limit (and
    says so): a silently shorter sequence would answer a different question.
    """
    limit = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if seq_len is None:
        return (min(128, limit) if limit else 128), ()
    if limit and seq_len > limit:
        given = next((k for k in _POSITION_LIMITS if k in config), None)
        if given:
            raise SpecError(f"--seq-len {seq_len} is longer than --config {given}={limit}; raise {given} or shorten --seq-len")
        key = next(k for k in _POSITION_LIMITS if hasattr(hf_config, k))
        setattr(hf_config, key, seq_len)
        return seq_len, (f"{key} raised from {limit} to {seq_len} for --seq-len {seq_len}",)
    return seq_len, ()


def _hf(model_type: str, config: dict, batch: int, seq_len: int | None, image_size: int | None) -> BuiltModel:
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.utils import logging

    logging.set_verbosity_error()
    if model_type not in CONFIG_MAPPING:
        raise SpecError(f"unknown HuggingFace model type {model_type!r}{_suggest(model_type, CONFIG_MAPPING.keys())}")
    defaults = CONFIG_MAPPING[model_type]()
    unknown = [k for k in config if not hasattr(defaults, k)]
    if unknown:
        raise SpecError(f"hf:{model_type} config has no field {unknown[0]!r}{_suggest(unknown[0], vars(defaults))}")
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except Exception as err:  # noqa: BLE001 -- invalid combinations of config values
        raise SpecError(f"cannot build hf:{model_type} from this config ({one_line(err, limit=200)})") from None
    length, notes = _fit_positions(hf_config, config, seq_len)
    model = _construct(f"hf:{model_type} from this config", lambda: AutoModel.from_config(hf_config), {})
    model.train()
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        tokens = torch.randint(0, hf_config.vocab_size, (batch, length))
        return BuiltModel(model, (tokens,), {}, f"hf:{model_type}", notes)
    if main == "pixel_values":
        size = image_size or getattr(hf_config, "image_size", 224)
        return BuiltModel(model, _images(batch, getattr(hf_config, "num_channels", 3), size), {}, f"hf:{model_type}")
    raise SpecError(f"hf:{model_type} takes {main!r}; give it inputs with a package.module:callable spec instead")


def _callable(spec: str, config: dict, batch: int, input_shape: tuple[int, ...] | None) -> BuiltModel:
    module_name, _, attr = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any import failure is the user's to fix
        raise SpecError(
            f"cannot import {module_name!r} ({one_line(err, limit=200)}); model specs are timm:NAME, torchvision:NAME, "
            "hf:MODEL_TYPE or package.module:callable"
        ) from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SpecError(f"{module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"{spec!r} is not callable")
    built = _construct(spec, target, config)
    model, args = built, None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        model, args = built
        args = args if isinstance(args, tuple) else (args,)
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"{spec!r} returned {_describe_value(built)}; expected a torch.nn.Module, or a pair (model, example inputs) "
            "with the model first and the inputs a tensor or a tuple of them"
        )
    if input_shape is not None:
        args = (torch.randn(batch, *input_shape),)
    if args is None:
        raise SpecError(f"{spec!r} returned a model without inputs; pass --input-shape (e.g. 3,224,224) or return (model, inputs)")
    return BuiltModel(model, args, {}, spec)


def build_model(
    spec: ModelSpec,
    config: dict | None = None,
    *,
    batch_size: int = 8,
    seq_len: int | None = None,
    image_size: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    device: str = "cpu",
) -> BuiltModel:
    """The model ``spec`` names, in train mode with random weights, and one training call.

    ``seq_len``: tokens per sample for language models (None: 128, capped by the config's
    positions). ``device="meta"``: model and inputs without storage (shapes and dtypes only).
    """
    config = dict(config or {})
    if batch_size < 2:
        raise SpecError(f"--batch-size must be at least 2 (tracing needs a batch dimension to vary), got {batch_size}")
    with torch.device("meta") if device == "meta" else nullcontext():
        built = _build(spec, config, batch_size, seq_len, image_size, input_shape)
    built.model.train()
    return built


def _build(spec: ModelSpec, config: dict, batch_size: int, seq_len: int | None, image_size: int | None,
           input_shape: tuple[int, ...] | None) -> BuiltModel:
    if spec.family == "builtin":
        built = _builtin(config, batch_size)
    elif spec.family == "timm":
        built = _timm(spec.name, config, batch_size, image_size)
    elif spec.family == "torchvision":
        built = _torchvision(spec.name, config, batch_size, image_size)
    elif spec.family == "hf":
        built = _hf(spec.name, config, batch_size, seq_len, image_size)
    else:
        built = _callable(spec.name, config, batch_size, input_shape)
    return built
