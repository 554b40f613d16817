"""Normal reference images of the evaluated data set, for methods that look at a few of them
(VAND's few-shot memory, thresholds from k normal target images).

With ``CrossDataset`` the datamodule's own train split is the *auxiliary* data (another data set),
never a source of target references; the target's own train split (normal images only) is.
"""

from __future__ import annotations

import copy
from typing import Any


def target_train_split(datamodule: Any) -> Any:  # noqa: ANN401
    """The train split (normal images) of the evaluated data set; for a ``CrossDataset`` its
    target, copied and set up on its own for its one test category."""
    target = getattr(datamodule, "target", None)
    if target is not None:
        target = copy.copy(target)  # the CrossDataset's own target keeps its state
        categories = datamodule.target_categories()
        if len(categories) != 1:
            msg = f"reference images of the target need one target category, got {categories}"
            raise ValueError(msg)
        target.category = categories[0]
        target.setup("fit")
        return target.train_data
    if getattr(datamodule, "train_data", None) is None:
        datamodule.setup("fit")
    return datamodule.train_data
