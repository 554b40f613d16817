"""Inference text features, computed once and frozen for export: one cache for every method.

At inference the text side of these methods depends only on the prompt words (the class name)
and on the learnt parameters of the text side (prompts, adapters), never on the image, so it is
computed once per class name and reused until those parameters change (an optimiser step, a
checkpoint load, a move to another device). Before export it is frozen into a buffer: the
traced graph then holds the features as a constant and no tokenizer or text tower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class TextFeatureCache(nn.Module):
    """Text features by class name, keyed on the state of the parameters they depend on.

    Args:
        compute: class name -> text features (run under ``no_grad``).
        depends_on: the parameters the features depend on (none for a frozen text side).
    """

    def __init__(self, compute: Callable[[str], torch.Tensor],
                 depends_on: Callable[[], Iterable[nn.Parameter]] = tuple) -> None:
        super().__init__()
        self._compute = compute
        self._depends_on = depends_on
        self.register_buffer("frozen", torch.empty(0), persistent=False)
        self._is_frozen = False
        self._entries: dict[str, torch.Tensor] = {}
        self._key: tuple | None = None

    def _state_key(self, device: torch.device) -> tuple:
        # ``_version`` counts in-place changes (optimiser steps, load_state_dict copies).
        return (*((p.data_ptr(), p._version) for p in self._depends_on()), device)  # noqa: SLF001

    def get(self, class_name: str) -> torch.Tensor:
        """The features of ``class_name`` for the parameters as they are now."""
        key = self._state_key(self.frozen.device)
        if key != self._key:
            self._entries, self._key = {}, key
        if class_name not in self._entries:
            with torch.no_grad():
                self._entries[class_name] = self._compute(class_name)
        return self._entries[class_name]

    def current(self, class_name: str) -> torch.Tensor:
        """The frozen features after :meth:`freeze`, else :meth:`get`."""
        return self.frozen if self._is_frozen else self.get(class_name)

    def freeze(self, class_name: str) -> None:
        """Store the features of ``class_name`` as a constant buffer (before export)."""
        self._is_frozen = False
        self.frozen = self.get(class_name).clone()
        self._is_frozen = True

    def unfreeze(self) -> None:
        self._is_frozen = False

    @property
    def is_frozen(self) -> bool:
        return self._is_frozen

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        """A move to another device or dtype invalidates what was computed (the key has the device)."""
        self._entries, self._key = {}, None
        return super()._apply(fn, recurse)
