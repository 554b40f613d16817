"""The contract every plugin model fills in: one constructor vocabulary, checks before any work,
a frozen backbone built when it is needed and bound to its checkpoint.

Two layers. :class:`ModelContract` is what every model shares, whatever its backbone: argument
checks raised together, the lazy build, the checkpoint identity of the frozen backbone (adopted
or refused on loading), safe official weights. :class:`ClipModelContract` fills it in for the
CLIP methods (the backbone is a CLIP from :mod:`anomalib_zsad.clip`, its identity includes the
activation, a mismatch is allowed by ``allow_clip_mismatch``). A model that is not CLIP-based
(BGAD: a timm CNN and normalizing flows) fills in the generic hooks itself: ``check_backbone``,
``load_backbone``, ``backbone_identity``, ``build_model``.

Why the backbone is built lazily. ``anomalib test --model X --ckpt_path c.ckpt`` constructs ``X`` from
the command line's defaults *before* Lightning reads the checkpoint; building ViT-L/14@336 there
would load 1.7 GB of weights that the checkpoint may not even want (it may have been trained on
ViT-B/16 at 224 px), and fail offline. So the constructor only checks and records its arguments;
the frozen backbone and the method's ``nn.Module`` are built at the first need: ``setup("fit")``,
a checkpoint being loaded, the first test/predict batch, or any access to ``self.model``.

Why a checkpoint carries its backbone's identity. Checkpoints leave the frozen backbone out (1.7 GB
for a CLIP ViT-L); what they learnt is only meaningful on the backbone they were trained with.
:func:`clip_identity` (CLIP) and :meth:`ModelContract.backbone_identity` (others) record the
architecture, the weights (tag, or file and its SHA-256), the seed of random weights and the
image size (and, for CLIP, the activation). On loading, a setting the user left at its default is
taken from the checkpoint (so ``--ckpt_path`` alone is enough, as with anomalib's own models); a
setting the user set to something else is refused with one message that says what the checkpoint
needs, unless the model's mismatch flag (``allow_clip_mismatch``, ``allow_backbone_mismatch``)
says it is meant.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from anomalib_zsad.clip import ClipModel, load_clip, named_architecture
from anomalib_zsad.clip.loading import RANDOM_TAGS

logger = logging.getLogger(__name__)

# The checkpoint key of the frozen backbone's identity (named when every model was CLIP-based; kept,
# so that earlier checkpoints still load).
IDENTITY_KEY = "anomalib_zsad_clip_identity"
IDENTITY_SETTINGS = ("backbone", "pretrained", "activation", "image_size", "seed")
ACTIVATIONS = ("auto", "gelu", "quick_gelu")
# Never taken from a checkpoint: they say how to load it, or they are live objects.
NOT_RESTORED = frozenset({"official_checkpoint", "allow_clip_mismatch", "allow_backbone_mismatch", "pre_processor",
                          "post_processor", "evaluator", "visualizer"})


class ArgumentCheck:
    """Collects every problem of a constructor's arguments, then raises them in one ``ValueError``
    (a user fixes them all at once instead of one per run)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.problems: list[str] = []

    def require(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def positive(self, name: str, value: float | None, *, zero: bool = False, optional: bool = False) -> None:
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
        self.require(ok, f"{name} must be {'>= 0' if zero else '> 0'}, got {value!r}")

    def in_range(self, name: str, value: float, low: float, high: float) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        self.require(ok, f"{name} must be in [{low}, {high}], got {value!r}")

    def choice(self, name: str, value: Any, choices: Sequence[Any]) -> None:  # noqa: ANN401
        self.require(value in choices, f"{name} must be one of {list(choices)}, got {value!r}")

    def layers(self, name: str, layers: Sequence[int] | None, depth: int | None) -> None:
        """1-based vision blocks, each in ``1..depth`` (depth None: unknown until the CLIP is read)."""
        if layers is None:
            return
        values = list(layers)
        self.require(bool(values), f"{name} must name at least one block, got {layers!r}")
        top = depth if depth is not None else 10**6
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top]
        self.require(not bad, f"{name} must be blocks in 1..{depth if depth else 'depth'} of the CLIP, got {bad}")

    def image_size(self, image_size: Any, patch_size: int | None) -> None:  # noqa: ANN401
        sides = [image_size] * 2 if isinstance(image_size, int) else list(image_size or [])
        valid = len(sides) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in sides)
        smallest = patch_size or 1
        if not valid or min(sides) < smallest:
            self.problems.append(f"image_size must be a side or [height, width] of at least one patch "
                                 f"({smallest} px), got {image_size!r}")
            return
        if patch_size and any(side % patch_size for side in sides):
            warnings.warn(f"{self.model}: image_size {image_size} is not a multiple of the patch size {patch_size}: "
                          f"the last {[s % patch_size for s in sides]} px of each side are not seen by the patch grid "
                          "and the map is stretched over them. Use a multiple of the patch size.", stacklevel=4)

    def raise_if_any(self) -> None:
        if self.problems:
            msg = f"{self.model}: " + "; ".join(self.problems)
            raise ValueError(msg)


def renamed_argument(model: str, new_name: str, new_value: Any, **old: Any) -> Any:  # noqa: ANN401
    """The value of a renamed argument: the new name's, or an old name's with a ``FutureWarning``."""
    given = {name: value for name, value in old.items() if value is not None}
    if not given:
        return new_value
    if new_value is not None or len(given) > 1:
        msg = f"{model}: give the official weights once, as {new_name} (got {sorted([new_name, *given])})"
        raise ValueError(msg)
    (old_name, value), = given.items()
    warnings.warn(f"{model}: {old_name} is deprecated, use {new_name}", FutureWarning, stacklevel=3)
    return value


def architecture_or_none(backbone: str) -> Any:  # noqa: ANN401
    """The named architecture, or None where only the weights file will tell (a local path)."""
    try:
        return named_architecture(backbone)
    except (ValueError, RuntimeError):
        return None


def is_random(pretrained: str | os.PathLike | None) -> bool:
    return pretrained in RANDOM_TAGS or str(pretrained).lower() in {"random", "none"}


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    del size, mtime  # part of the cache key: a changed file is hashed again
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(pretrained: str | os.PathLike | None) -> str | None:
    """SHA-256 of a local weights file (None for a tag or random weights)."""
    if is_random(pretrained) or not Path(str(pretrained)).expanduser().is_file():
        return None
    path = Path(str(pretrained)).expanduser().resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime)


def clip_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies the frozen CLIP (and its input size) of a model with these settings."""
    image_size = settings.get("image_size")
    identity = {
        "backbone": settings.get("backbone"),
        "pretrained": None if is_random(settings.get("pretrained")) else str(settings.get("pretrained")),
        "weights_sha256": weights_sha256(settings.get("pretrained")),
        "activation": settings.get("activation", "auto"),
        "image_size": list(image_size) if isinstance(image_size, (list, tuple)) else image_size,
    }
    if identity["pretrained"] is None:  # random weights: the seed decides them
        identity["seed"] = settings.get("seed")
    return identity


def _same_weights(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    if stored.get("weights_sha256") and current.get("weights_sha256"):
        return stored["weights_sha256"] == current["weights_sha256"]
    return stored.get("pretrained") == current.get("pretrained")


WEIGHT_KEYS = frozenset({"pretrained", "weights_sha256"})


def identity_conflicts(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each way the current backbone differs from the checkpoint's, as ``what: checkpoint vs now``:
    every stored setting (for a CLIP: backbone, activation, image size, seed), then the weights
    (compared by content where both are files)."""
    problems = []
    for key in [k for k in stored if k not in WEIGHT_KEYS]:
        if _comparable(stored.get(key)) != _comparable(current.get(key)):
            problems.append(f"{key}: checkpoint {stored.get(key)!r}, now {current.get(key)!r}")
    if not _same_weights(stored, current):
        problems.append(f"pretrained: checkpoint {stored.get('pretrained')!r} "
                        f"(sha256 {str(stored.get('weights_sha256'))[:12]}), now {current.get('pretrained')!r}")
    return problems


def constructor_defaults(cls: type) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _comparable(value: Any) -> Any:  # noqa: ANN401
    return list(value) if isinstance(value, tuple) else value


class ModelContract:
    """The part of the contract that needs no Lightning and no CLIP: settings, checks, lazy build,
    the frozen backbone's checkpoint identity.

    A model declares:
    * ``paper_max_epochs`` (its paper's training length; None for models that do not train),
    * :meth:`check_arguments` (its own checks, added to the shared ones),
    * :meth:`check_backbone` / :meth:`load_backbone` / :meth:`backbone_identity` (its frozen
      backbone: checked at construction, built at first need, identified in checkpoints;
      :class:`ClipModelContract` fills these in for a CLIP),
    * :meth:`build_model` (its ``nn.Module`` around the loaded backbone),
    * :meth:`read_official_weights` / :meth:`load_official_weights` (its ``checkpoint.py``).
    """

    paper_max_epochs: ClassVar[int | None] = None
    has_learnt_parts: ClassVar[bool] = True
    # True where the text side depends on the image (AdaCLIP's dynamic prompts): the text tower is
    # then part of the exported graph; otherwise text features are a constant of it.
    text_depends_on_image: ClassVar[bool] = False
    #: state-dict prefixes of the frozen backbone, left out of checkpoints and rebuilt from the settings
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("model.backbone.",)
    #: the constructor argument that lets a checkpoint run on another backbone than it was trained on
    mismatch_flag: ClassVar[str] = "allow_backbone_mismatch"
    #: what the backbone is called in messages
    backbone_noun: ClassVar[str] = "backbone"
    #: trains on the target's normal images plus a few of its anomalies (the benchmark's "supervised" regime)
    learns_from_anomalies: ClassVar[bool] = False

    # ------------------------------------------------------------------ what a model fills in
    def check_arguments(self, check: ArgumentCheck, settings: dict[str, Any], arch: Any) -> None:  # noqa: ANN401
        """Add the model's own argument problems to ``check`` (``arch``: the backbone's shape or None)."""

    def check_backbone(self, check: ArgumentCheck, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        """Check the backbone's settings without building it; return what is known of its shape
        (passed to :meth:`check_arguments`), or None. Default: a backbone name and an image size."""
        check.require(isinstance(settings.get("backbone"), str) and bool(settings.get("backbone")),
                      f"backbone must be a name, got {settings.get('backbone')!r}")
        check.image_size(settings.get("image_size"), None)
        return None

    def load_backbone(self, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        """The frozen backbone for these settings (weights resolved here, with a clear error offline)."""
        raise NotImplementedError

    def backbone_shape(self, backbone: Any) -> Any:  # noqa: ANN401
        """What the loaded backbone tells of its shape, for the checks repeated after loading."""
        del backbone
        return None

    def backbone_identity(self, settings: dict[str, Any]) -> dict[str, Any]:
        """What identifies the frozen backbone (and the input size) of a model with these settings:
        its name, its weights (tag or file and SHA-256), the seed of random weights, the image size."""
        image_size = settings.get("image_size")
        pretrained = settings.get("pretrained")
        random = pretrained is False or is_random(pretrained)
        identity = {
            "backbone": settings.get("backbone"),
            "pretrained": None if random else (pretrained if isinstance(pretrained, bool) else str(pretrained)),
            "weights_sha256": None if random or isinstance(pretrained, bool) else weights_sha256(pretrained),
            "image_size": list(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        }
        if random:
            identity["seed"] = settings.get("seed")
        return identity

    def build_model(self, backbone: Any) -> nn.Module:  # noqa: ANN401
        raise NotImplementedError

    @staticmethod
    def read_official_weights(path: Any) -> Any:  # noqa: ANN401
        """Read and check an official weights file (construction time, before any work)."""
        raise NotImplementedError

    @staticmethod
    def load_official_weights(model: nn.Module, path: Any) -> None:  # noqa: ANN401
        raise NotImplementedError

    def after_build(self) -> None:
        """Work that needs the built model (e.g. text features), run once after each build."""

    # ------------------------------------------------------------------ shared machinery
    @property
    def settings(self) -> dict[str, Any]:
        """The constructor's arguments as saved by ``save_hyperparameters`` (checkpoint-adopted
        values included)."""
        return dict(self.hparams)

    def validate_arguments(self) -> None:
        """All checks at construction: the backbone's, then the model's, raised together."""
        settings = self.settings
        check = ArgumentCheck(type(self).__name__)
        arch = self.check_backbone(check, settings)
        self.check_arguments(check, settings, arch)
        check.raise_if_any()

    def init_official_weights(self, path: Any) -> None:  # noqa: ANN401
        """Check an official weights file now (a wrong file fails before any work); load it when
        the model is built. The model counts as trained from here on."""
        self._official_weights_path = path
        if path is not None:
            self.read_official_weights(path)
            self.learnt_parts_trained.fill_(True)

    @property
    def model(self) -> nn.Module:
        """The method's ``nn.Module``, built at first use (see the module docstring)."""
        modules = self.__dict__["_modules"]
        if "model" not in modules:
            self.build()
        return modules["model"]

    @property
    def is_built(self) -> bool:
        return "model" in self.__dict__["_modules"]

    def build(self) -> None:
        """Load the frozen backbone and build the method's module on it (again, after a change)."""
        settings = self.settings
        backbone = self.load_backbone(settings)
        check = ArgumentCheck(type(self).__name__)  # again, now that the weights told the shape
        self.check_arguments(check, settings, self.backbone_shape(backbone))
        check.raise_if_any()
        module = self.build_model(backbone)
        device = getattr(self, "device", torch.device("cpu"))
        nn.Module.__setattr__(self, "model", module.to(device))
        path = getattr(self, "_official_weights_path", None)
        if path is not None:
            self.load_official_weights(module, path)
        self.after_build()

    def identity(self) -> dict[str, Any]:
        return self.backbone_identity(self.settings)

    def adopt_checkpoint_settings(self, checkpoint: dict[str, Any]) -> None:
        """Take the settings a checkpoint was made with where the user left the defaults; refuse a
        backbone (or image size) that differs from the checkpoint's unless the mismatch flag is set."""
        stored = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items()
                  if k not in NOT_RESTORED and k != self.mismatch_flag}
        defaults = constructor_defaults(type(self))
        current = self.settings
        adopted = {}
        for name, value in stored.items():
            if name not in defaults or _comparable(current.get(name)) == _comparable(value):
                continue
            if _comparable(current.get(name)) == _comparable(defaults[name]):
                adopted[name] = value
        if adopted:
            logger.info("%s: settings taken from the checkpoint: %s", type(self).__name__, adopted)
            self.hparams.update(adopted)
        stored_identity = checkpoint.get(IDENTITY_KEY)
        if stored_identity is not None:
            conflicts = identity_conflicts(stored_identity, self.identity())
            if conflicts and not current.get(self.mismatch_flag, False):
                msg = (f"{type(self).__name__}: this checkpoint was trained on another {self.backbone_noun} or input "
                       f"size than the one asked for ({'; '.join(conflicts)}). Leave these settings out to use the "
                       f"checkpoint's, give the checkpoint's values, or pass {self.mismatch_flag}=True to run it "
                       "anyway.")
                raise ValueError(msg)
        if adopted or not self.is_built:
            self.apply_settings(rebuild=bool(adopted) or not self.is_built)

    def apply_settings(self, rebuild: bool) -> None:
        """After settings changed: the default pre-processor follows ``image_size``; rebuild."""
        if getattr(self, "_default_pre_processor", False) and self.pre_processor is not None:
            fresh = self.configure_pre_processor(self.settings["image_size"])
            self.pre_processor.transform = fresh.transform
            self.pre_processor.export_transform = fresh.export_transform
            # anomalib's datamodule copied the model's Resize into its datasets when it was set up,
            # before the checkpoint was read: give them the new one (else images are resized twice).
            trainer = getattr(self, "_trainer", None)
            update = getattr(getattr(trainer, "datamodule", None), "_update_augmentations", None)
            if callable(update):
                update()
        if rebuild:
            self.__dict__["_modules"].pop("model", None)
            self.build()


class ClipModelContract(ModelContract):
    """:class:`ModelContract` for the CLIP methods: the backbone is a frozen CLIP of
    :mod:`anomalib_zsad.clip` (``backbone``/``pretrained``/``activation``), resized to
    ``image_size`` as the model's official code does (``pos_embed_mode``).

    A CLIP model declares, besides :class:`ModelContract`'s ``check_arguments``/``build_model``/
    official weights: ``pos_embed_mode`` (how its official code resizes the CLIP's position
    embeddings). ``build_model`` receives the loaded :class:`~anomalib_zsad.clip.ClipModel`.
    """

    pos_embed_mode: ClassVar[str] = "bicubic_antialias"
    frozen_prefixes: ClassVar[tuple[str, ...]] = ("model.clip.",)
    mismatch_flag: ClassVar[str] = "allow_clip_mismatch"
    backbone_noun: ClassVar[str] = "CLIP"

    def check_backbone(self, check: ArgumentCheck, settings: dict[str, Any]) -> Any:  # noqa: ANN401
        """Activation, a CLIP architecture name, and an image size on its patch grid."""
        check.choice("activation", settings.get("activation", "auto"), ACTIVATIONS)
        check.require(isinstance(settings.get("backbone"), str) and settings.get("backbone"),
                      f"backbone must be a CLIP architecture name, got {settings.get('backbone')!r}")
        named = isinstance(settings.get("backbone"), str) and settings.get("backbone")
        arch = architecture_or_none(settings["backbone"]) if named else None
        if arch is None and named and is_random(settings.get("pretrained")):
            try:  # random weights: only the name can give the shape
                named_architecture(settings["backbone"])
            except ValueError as error:
                check.problems.append(str(error))
        check.image_size(settings.get("image_size"), arch.patch_size if arch is not None else None)
        return arch

    def load_backbone(self, settings: dict[str, Any]) -> ClipModel:
        return load_clip(settings["backbone"], settings["pretrained"], activation=settings.get("activation", "auto"),
                         pos_embed_mode=self.pos_embed_mode, seed=settings.get("seed", 0))

    def backbone_shape(self, backbone: ClipModel) -> Any:  # noqa: ANN401
        return backbone.arch

    def backbone_identity(self, settings: dict[str, Any]) -> dict[str, Any]:
        return clip_identity(settings)

    def build_model(self, clip: ClipModel) -> nn.Module:
        raise NotImplementedError
