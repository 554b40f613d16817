"""The deployment scripts of benchmarks/ run end to end on a tiny random CLIP and print their tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def table_rows(output: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


@pytest.mark.slow
def test_latency_script_times_torch_openvino_and_int8(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The script's own process runs here (its export and INT8 calibration); each backend is
    timed in a worker process of its own, as always."""
    code = load_script("latency.py").main(["--backbone", "zsad-tiny", "--image-size", "64", "--runs", "1",
                                           "--backends", "torch", "openvino", "openvino-int8",
                                           "--calibration-images", "2", "--batch-size", "2",
                                           "--work-dir", str(tmp_path / "work")])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "batch 2," in output
    rows = table_rows(output)
    assert set(rows) == {"torch", "openvino", "openvino-int8"}
    for cells in rows.values():
        assert float(cells[1]) > 0  # median seconds per batch
        assert float(cells[3]) == pytest.approx(2 / float(cells[1]), rel=2e-2)  # images per second
    score_diff, map_diff = (float(x) for x in rows["openvino"][6].split(" / "))
    assert score_diff < 1e-4 and map_diff < 1e-4  # FP32 export computes what torch computes


@pytest.mark.slow
def test_int8_accuracy_script_reports_auroc_change_and_rank_agreement(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the script's main in this process (one import of torch and anomalib less)
    code = load_script("int8_accuracy.py").main(["--image-size", "64", "--epochs", "1", "--test-good", "3",
                                                 "--test-defect", "3", "--train-categories", "brick",
                                                 "--test-categories", "coffee", "--root", str(tmp_path / "demo"),
                                                 "--output", str(tmp_path / "out")])
    output = capsys.readouterr().out
    assert code == 0, output
    rows = table_rows(output)
    assert list(rows) == ["fp32", "int8_ptq"]
    assert rows["fp32"][1] == "+0.00" and rows["fp32"][4] == "1.0000 / 1.0000"
    for cells in rows.values():
        assert 0 <= float(cells[0]) <= 100 and 0 <= float(cells[2]) <= 100
        assert re.fullmatch(r"-?[01]\.\d{4} / -?[01]\.\d{4}", cells[4])
    assert (tmp_path / "out" / "int8_accuracy.md").read_text().startswith("| export |")


def load_script(name: str):
    """A benchmarks/ script as a module, to call its ``main`` in this process (no second import of torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_cpu_fallback_trains_tests_and_compares_precisions(capsys: pytest.CaptureFixture) -> None:
    gpu_check = load_script("gpu_check.py")
    code = gpu_check.main(["--device", "cpu", "--models", "Vand", "--precisions", "bf16-mixed", "--image-size", "64",
                           "--no-latency"])
    output = capsys.readouterr().out
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith("| Vand ")]
    assert [cells[1].strip() for cells in rows] == ["bf16-mixed"], output
    cells = rows[0]
    assert cells[-1].strip() == "ok", output
    assert 0.0 <= float(cells[4]) <= 1.0  # image AUROC
    assert 0.0 < float(cells[6]) <= gpu_check.TOLERANCE["bf16-mixed"]  # bf16 autocast did run, within tolerance
    assert code == 0 and output.rstrip().endswith("all checks passed")


def test_gpu_check_says_when_cuda_is_missing(capsys: pytest.CaptureFixture) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-device message cannot be seen here")
    assert load_script("gpu_check.py").main(["--models", "Vand"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# ---- latency.py --official-src: the pieces that run without the official code ----------------------------
# The official code cannot be part of the tests (it is fetched and exported by hand), so these check what
# our side gives it: the CLIP in OpenAI's layout and each model's learnt weights in the official format,
# read back by our own importers into a fresh model.


def _tiny(name: str):
    import anomalib_zsad.models

    return getattr(anomalib_zsad.models, name)(backbone="zsad-tiny", pretrained=None, image_size=64).eval()


def test_official_clip_archive_holds_our_clip_in_openai_layout(tmp_path: Path) -> None:
    import torch

    official_code = load_script("official_code.py")
    model = _tiny("Vand")
    clip = model.model.clip
    official_code.round_to_fp16(clip)
    assert all(torch.equal(p, p.half().float()) for p in clip.parameters())  # the loaders' fp16 round trip is exact
    official_code.write_openai_archive(clip, tmp_path / "clip.pt")
    archive = torch.jit.load(str(tmp_path / "clip.pt")).state_dict()
    ours = clip.state_dict()
    assert {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight",
            "visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"} <= set(archive)
    assert not any(key.startswith("text.") for key in archive)  # OpenAI's names: no tower prefix for text
    back = {(key if key.startswith(("visual.", "logit_scale")) else f"text.{key}"): value
            for key, value in archive.items()}
    assert set(back) == set(ours)
    assert all(torch.equal(back[key], ours[key]) for key in ours)


@pytest.mark.parametrize("name", ["Vand", "AACLIP", "AdaCLIP", "BayesPFL"])
def test_official_weight_export_reads_back_into_a_fresh_model(name: str, tmp_path: Path) -> None:
    """What latency.py hands the official code is what the model holds: our importer of the official
    format gives a second (differently initialised) model the same learnt tensors."""
    import torch

    official_code = load_script("official_code.py")
    source, target = _tiny(name), _tiny(name)
    with torch.no_grad():  # make the learnt tensors differ from any initialisation
        for key, value in source.model.named_parameters():
            if not key.startswith("clip."):
                value.add_(0.01 * torch.randn_like(value))
    config = official_code.RUNNERS[name][1](source, tmp_path)
    assert json.loads(json.dumps(config)) == config  # goes into official.json
    if name == "AACLIP":
        from anomalib_zsad.models.aa_clip import load_official_checkpoint

        load_official_checkpoint(target.model, tmp_path / "text_adapter.pth", tmp_path / "image_adapter_1.pth")
    else:
        module = __import__(f"anomalib_zsad.models.{ {'Vand': 'vand', 'AdaCLIP': 'adaclip', 'BayesPFL': 'bayes_pfl'}[name] }",
                            fromlist=["load_official_checkpoint"])
        module.load_official_checkpoint(target.model, tmp_path / "official-weights.pt")
    learnt = {k: v for k, v in source.model.named_parameters() if not k.startswith("clip.")}
    loaded = dict(target.model.named_parameters())
    assert learnt and all(torch.equal(value, loaded[key]) for key, value in learnt.items())
    if name == "AdaCLIP":  # test.py's defaults, which the official trainer is built with
        assert config["hyper"] == {"prompting_depth": 4, "prompting_length": 5, "prompting_branch": "VL",
                                   "prompting_type": "SD", "use_hsf": True, "k_clusters": 20}
    if name == "BayesPFL":
        assert config["args"] | {"features_list": None} == {
            "vision_width": 64, "text_width": 64, "embed_dim": 32, "prompt_num": 3, "prompt_context_len": 5,
            "prompt_state_len": 5, "num_flows": 10, "sample_num": 10, "features_list": None}


# ---- train_step.py: one training step of ours (the official side needs the official code) ----------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["Vand"])  # every model's training step runs in tests/models/test_contract_flow.py
def test_train_step_script_times_our_training_step(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The script's ours-side: a finite first-step loss, every learnt tensor updated by the step, the
    table printed; and, in this process, that its step is the module's own training step: the batch it
    saved gives that loss again on a fresh model."""
    import math

    import torch

    script = load_script("train_step.py")
    work = tmp_path / "work"
    code = script.main(["--model", name, "--backbone", "zsad-tiny", "--image-size", "64", "--batch-size", "2",
                        "--runs", "1", "--work-dir", str(work)])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "batch 2," in output
    rows = table_rows(output)
    assert list(rows) == ["ours"]
    cells = rows["ours"]
    assert float(cells[1]) > 0 and float(cells[3]) == pytest.approx(2 / float(cells[1]), rel=2e-2)
    loss = float(cells[6])
    assert math.isfinite(loss) and loss > 0
    changed, learnt = (int(x) for x in cells[8].split("/"))
    assert learnt > 0 and changed == learnt  # the optimiser step moved every learnt tensor

    batch = torch.load(work / "batch.pt", weights_only=True)
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].tolist() == [1, 0]
    assert batch["mask"][0].any() and not batch["mask"][1].any()  # the anomalous image has a defect
    args = script.parse_args(["--model", name, "--backbone", "zsad-tiny", "--image-size", "64", "--worker", "ours"])
    step, params = script.ours_step(args, work, batch)
    before = [p.detach().clone() for p in params]
    assert step() == pytest.approx(loss, rel=1e-4)
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
