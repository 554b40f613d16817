"""Make anomalib find this plugin's models, at almost no start-up cost.

A ``.pth`` file installed with the package calls :func:`install` at interpreter start. That only
puts tiny finders on ``sys.meta_path``; nothing heavy is imported. When some code later imports
``anomalib.models`` (the ``anomalib`` CLI, ``get_model``, a user script), the finder lets the
import run as usual and then imports :mod:`anomalib_zsad.models` and :mod:`anomalib_zsad.data`;
when ``anomalib.cli.pipelines`` is imported, the plugin's benchmark pipeline (which runs
zero-shot models, see ``docs/benchmark.md``) replaces anomalib's in its registry. So:

* ``anomalib train --model AnomalyCLIP`` resolves the short name (jsonargparse lists the
  imported subclasses of ``AnomalibModule``);
* ``anomalib.models.get_model("AnomalyCLIP")`` finds it (it scans direct subclasses);
* ``get_model({"class_path": "anomalib_zsad.models.AnomalyCLIP"})`` passes anomalib's whitelist
  of importable modules (``ALLOWED_MODULES``), to which the plugin's package is added;
* ``anomalib benchmark`` runs zero-shot, few-shot, auxiliary-trained and full-shot models.

Nothing else of anomalib is changed: no function is rebound (the plugin's datamodules read images
with their own reader; ``anomalib_zsad.data.install_rgb_image_reader()`` is an explicit opt-in).

Eager import from the ``.pth`` would cost seconds on every Python start (torch, anomalib); this
costs nothing until anomalib itself is used. Set ``ANOMALIB_ZSAD_NO_AUTOLOAD=1`` to switch it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys

TRIGGER = "anomalib.models"
PLUGIN_MODULES = ("anomalib_zsad.models", "anomalib_zsad.data")
logger = logging.getLogger(__name__)


def activate() -> None:
    """Import the plugin's models and data modules and allow them in anomalib's whitelist."""
    import importlib

    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except Exception:
            logger.exception("anomalib-zsad: could not import %s", name)
    allowed = getattr(sys.modules.get(TRIGGER), "ALLOWED_MODULES", None)
    if isinstance(allowed, set):
        models = sys.modules.get("anomalib_zsad.models")
        allowed.add("anomalib_zsad.models")
        for name in getattr(models, "__all__", ()):  # each model's package, e.g. anomalib_zsad.models.vand
            allowed.add(getattr(models, name).__module__.rsplit(".", 1)[0])


def activate_benchmark(pipelines) -> None:  # noqa: ANN001
    """Put the plugin's benchmark pipeline into anomalib's CLI registry (``anomalib benchmark``)."""
    try:
        from anomalib_zsad.benchmark import install_pipeline

        install_pipeline(pipelines.PIPELINE_REGISTRY)
    except Exception:
        logger.exception("anomalib-zsad: could not register the benchmark pipeline")


# Module -> what to run right after it is imported. ``anomalib.cli.pipelines`` imports
# ``anomalib.models`` before it defines ``PIPELINE_REGISTRY``, hence its own trigger.
HOOKS = {
    TRIGGER: lambda module: activate(),  # noqa: ARG005
    "anomalib.cli.pipelines": activate_benchmark,
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``trigger`` to run ``callback(module)`` after it."""

    def __init__(self, trigger: str, callback) -> None:  # noqa: ANN001
        self.trigger = trigger
        self.callback = callback

    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001, ANN202
        if fullname != self.trigger:
            return None
        sys.meta_path.remove(self)  # once only, and no recursion into ourselves
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback
        original_exec = loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            original_exec(module)
            callback(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called from ``anomalib_zsad_register.pth`` at interpreter start."""
    if os.environ.get("ANOMALIB_ZSAD_NO_AUTOLOAD") == "1":
        return
    for trigger, callback in HOOKS.items():
        if trigger in sys.modules:  # already imported (install() called late)
            callback(sys.modules[trigger])
        elif not any(isinstance(f, _AfterImport) and f.trigger == trigger for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(trigger, callback))
