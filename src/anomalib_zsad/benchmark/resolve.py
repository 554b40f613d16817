"""Turn ``{class_path, init_args}`` entries of a benchmark config into objects.

Why not anomalib's own ``get_model`` / ``get_datamodule``?

* ``anomalib.models.get_model`` refuses any dotted ``class_path`` outside ``anomalib.models``
  (a whitelist against code execution from config files), so ``anomalib_zsad.models.AnomalyCLIP``
  or ``anomalib_zsad.benchmark.WinClipFixed`` cannot be named there.
* ``anomalib.data.get_datamodule`` keeps only the last segment of ``class_path`` and looks it up
  in ``anomalib.data``, so ``anomalib_zsad.data.CrossDataset`` cannot be named either.

This module keeps the spirit of the whitelist (only ``anomalib`` and ``anomalib_zsad`` modules
may be imported) and adds the plugin namespace. Short names (``Patchcore``, ``MVTecAD``) are looked
up in ``anomalib.models`` / ``anomalib.data`` first, then in the plugin's packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

#: Module prefixes a config file may import classes from.
ALLOWED_PREFIXES: tuple[str, ...] = ("anomalib", "anomalib_zsad")

#: Where short model names are searched, in order.
MODEL_NAMESPACES: tuple[str, ...] = ("anomalib.models", "anomalib_zsad.models", "anomalib_zsad.benchmark")
#: Where short data-module names are searched, in order.
DATA_NAMESPACES: tuple[str, ...] = ("anomalib.data", "anomalib_zsad.data")


#: String in an auxiliary ``train_data`` config that stands for the target datamodule.
TARGET_PLACEHOLDER = "$target"


class ConfigResolutionError(ValueError):
    """A ``class_path`` in a benchmark config cannot be imported or is not allowed."""


def _is_allowed(module_path: str) -> bool:
    return any(module_path == p or module_path.startswith(p + ".") for p in ALLOWED_PREFIXES)


def import_class(class_path: str, namespaces: Sequence[str]) -> type:
    """Import ``class_path`` (dotted, or a short name searched in ``namespaces``).

    Raises:
        ConfigResolutionError: if the module is outside :data:`ALLOWED_PREFIXES` or the class
            does not exist.
    """
    if "." in class_path:
        module_path, _, name = class_path.rpartition(".")
        if not _is_allowed(module_path):
            msg = (f"refusing to import {class_path!r}: only classes under "
                   f"{', '.join(p + '.*' for p in ALLOWED_PREFIXES)} may be named in a benchmark config")
            raise ConfigResolutionError(msg)
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as error:
            msg = f"cannot import {module_path!r} for class_path {class_path!r}: {error}"
            raise ConfigResolutionError(msg) from error
        if not hasattr(module, name):
            msg = f"module {module_path!r} has no class {name!r}"
            raise ConfigResolutionError(msg)
        return getattr(module, name)

    lowered = class_path.replace("_", "").lower()
    for namespace in namespaces:
        try:
            module = importlib.import_module(namespace)
        except ModuleNotFoundError:
            continue
        if hasattr(module, class_path):
            return getattr(module, class_path)
        # anomalib accepts snake_case / any case names ("patchcore", "reverse_distillation").
        for attr in getattr(module, "__all__", dir(module)):
            if attr.lower() == lowered and isinstance(getattr(module, attr, None), type):
                return getattr(module, attr)
    msg = f"unknown class {class_path!r}; searched {', '.join(namespaces)}. Use a dotted class_path."
    raise ConfigResolutionError(msg)


def instantiate(
    value: Any,  # noqa: ANN401
    namespaces: Sequence[str] = MODEL_NAMESPACES,
    substitutions: Mapping[str, Any] | None = None,
) -> Any:  # noqa: ANN401
    """Recursively build objects from ``{class_path, init_args}`` mappings.

    Nested entries (e.g. the ``train``/``test`` datamodules of a ``CrossDataset``) are resolved
    with both namespace lists. A string equal to a key of ``substitutions`` is replaced by its
    value: the benchmark passes ``{"$target": <target datamodule>}`` so an auxiliary datamodule
    can name the data set under test. Lists stay lists; other values pass through unchanged.
    """
    substitutions = substitutions or {}
    if isinstance(value, str) and value in substitutions:
        return substitutions[value]
    if isinstance(value, Mapping) and "class_path" in value:
        cls = import_class(str(value["class_path"]), namespaces)
        init_args = {k: instantiate(v, (*MODEL_NAMESPACES, *DATA_NAMESPACES), substitutions)
                     for k, v in dict(value.get("init_args") or {}).items()}
        if "image_size" in init_args and isinstance(init_args["image_size"], list):
            init_args["image_size"] = tuple(init_args["image_size"])
        return cls(**init_args)
    if isinstance(value, Mapping):
        return {k: instantiate(v, namespaces, substitutions) for k, v in value.items()}
    if isinstance(value, list):
        return [instantiate(v, namespaces, substitutions) for v in value]
    return value


def build_model(config: Mapping[str, Any]) -> Any:  # noqa: ANN401
    """Instantiate an anomalib model from ``{class_path, init_args}``."""
    return instantiate(config, MODEL_NAMESPACES)


def build_datamodule(config: Mapping[str, Any], target: Any = None) -> Any:  # noqa: ANN401
    """Instantiate a datamodule from ``{class_path, init_args}``; ``"$target"`` -> ``target``."""
    return instantiate(config, DATA_NAMESPACES, {TARGET_PLACEHOLDER: target} if target is not None else None)
