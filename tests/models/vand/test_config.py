"""configs/model/vand.yaml names only real constructor arguments, with the official defaults."""

from __future__ import annotations

import inspect

import yaml
from conftest import PROJECT_ROOT

from anomalib_zsad.models.vand import Vand


def test_config_matches_the_constructor() -> None:
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "model" / "vand.yaml").read_text())
    assert config["model"]["class_path"] == "Vand"
    init_args = config["model"]["init_args"]
    parameters = inspect.signature(Vand.__init__).parameters
    assert set(init_args) <= set(parameters)
    for name, value in init_args.items():
        default = parameters[name].default
        assert (list(default) if isinstance(default, tuple) else default) == value, name
    assert config["trainer"]["max_epochs"] == 15  # official train.sh
