"""The data and benchmark configs of issue 17: medical protocol, AdaCLIP's mixed sources, AA-CLIP's few-shot
training, the medical benchmark grid. They build as written, and the medical one runs on converted fake sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from anomalib.data import AnomalibDataModule, MVTecAD, Visa

from anomalib_zsad.data import CrossDataset, MVTecLayout
from anomalib_zsad.data.convert import convert

from . import fake_layouts as fake

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _parse(config: dict) -> CrossDataset:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    return parser.instantiate_classes(parser.parse_args(["--data", yaml.safe_dump(config)])).data


@pytest.mark.parametrize(("name", "sources", "target", "shots"), [
    ("medical_from_colondb.yaml", [MVTecLayout], MVTecLayout, None),
    ("adaclip_mvtec_colondb.yaml", [MVTecAD, MVTecLayout], Visa, None),
    ("adaclip_visa_clinicdb.yaml", [Visa, MVTecLayout], MVTecAD, None),
    ("aaclip_fewshot.yaml", [Visa], MVTecAD, 16),
])
def test_data_configs_build(name: str, sources: list[type], target: type, shots: int | None) -> None:
    datamodule = _parse(yaml.safe_load((CONFIGS / "data" / name).read_text()))
    assert [type(s) for s in datamodule.sources] == sources and type(datamodule.target) is target
    assert datamodule.shots_per_category == shots and datamodule.train_batch_size in {2, 8}


def test_medical_config_runs_on_converted_sets(tmp_path: Path) -> None:
    fake.polyps(tmp_path / "download" / "CVC-ColonDB")
    fake.headct(tmp_path / "download_headct")
    colondb = convert("colondb", tmp_path / "download", tmp_path / "ColonDB")
    headct = convert("headct", tmp_path / "download_headct", tmp_path / "HeadCT")
    config = yaml.safe_load((CONFIGS / "data" / "medical_from_colondb.yaml").read_text())
    config["init_args"]["train"][0]["init_args"]["root"] = str(colondb)
    config["init_args"]["test"]["init_args"]["root"] = str(headct)
    config["init_args"]["num_workers"] = 0
    datamodule = _parse(config)
    datamodule.setup()
    assert datamodule.name == "HeadCT" and datamodule.category == "brain"
    assert set(datamodule.train_data.samples.source) == {"ColonDB"} and len(datamodule.test_data) == 5


def test_medical_grid_expands_and_never_trains_on_its_target() -> None:
    from anomalib_zsad.benchmark.generator import ZSADBenchmarkJobGenerator
    from anomalib_zsad.benchmark.job import select_train_data
    from anomalib_zsad.benchmark.resolve import DATA_NAMESPACES, MODEL_NAMESPACES, import_class

    config = yaml.safe_load((CONFIGS / "benchmark" / "medical_grid.yaml").read_text())
    jobs = list(ZSADBenchmarkJobGenerator("cpu")(config["benchmark"]))
    assert len(jobs) == 8 * 10
    for job in jobs:
        import_class(job.model_entry["class_path"], MODEL_NAMESPACES)
        assert import_class(job.data_config["class_path"], DATA_NAMESPACES) is MVTecLayout
        if job.model_entry.get("train_data"):
            aux = select_train_data(job.model_entry["train_data"], job.data_config["name"], "MVTecLayout")
            train_root = Path(aux["init_args"]["train"]["init_args"]["root"])
            assert train_root != Path(job.data_config["init_args"]["root"])
