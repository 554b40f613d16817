"""The offline demo set: layout, exact masks, determinism, idempotency, atomicity, anomalib reads it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_zsad.data import DatasetError, make_demo_dataset
from anomalib_zsad.data import demo as demo_module
from anomalib_zsad.data._defects import PAINTERS, perlin_noise
from anomalib_zsad.data.demo import DEFECT_TYPES, MANIFEST, main

from .conftest import TINY


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_layout_counts_and_masks(demo_root: Path) -> None:
    for category in ("brick", "grass", "coffee"):
        cat = demo_root / category
        assert len(list((cat / "train" / "good").glob("*.png"))) == TINY["n_train"]
        assert len(list((cat / "test" / "good").glob("*.png"))) == TINY["n_test_good"]
        defects = sorted(p for p in (cat / "test").glob("*/*.png") if p.parent.name != "good")
        assert len(defects) == TINY["n_test_defect"]
        assert {p.parent.name for p in defects} == set(DEFECT_TYPES)  # 4 defects round-robin over 4 types
        for image_path in defects:
            mask_path = cat / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
            image, mask = Image.open(image_path), np.asarray(Image.open(mask_path))
            assert image.mode == "RGB" and image.size == (64, 64) and mask.shape == (64, 64)
            assert set(np.unique(mask)) == {0, 255}
            assert 0.002 < (mask > 0).mean() < 0.5


@pytest.mark.parametrize("defect", sorted(PAINTERS))
def test_masks_are_exactly_the_changed_pixels(defect: str) -> None:
    rng = np.random.default_rng(3)
    image = np.full((64, 64, 3), 0.5) + rng.uniform(-0.05, 0.05, (64, 64, 3))
    foreign = np.full((64, 64, 3), 0.95)
    out, mask = PAINTERS[defect](image, np.random.default_rng(7), foreign)
    changed = np.abs(out - image).max(axis=2) > 1e-9
    assert mask.dtype == bool and mask.any()
    assert np.array_equal(changed, mask)


def test_perlin_noise_is_seeded_and_bounded() -> None:
    a = perlin_noise(40, 56, (4, 4), np.random.default_rng(1))
    b = perlin_noise(40, 56, (4, 4), np.random.default_rng(1))
    assert a.shape == (40, 56) and np.array_equal(a, b)
    assert np.abs(a).max() <= 1.5 and a.std() > 0.05


def test_deterministic_from_seed(tmp_path: Path) -> None:
    kwargs = {"categories": ("gravel",), **TINY}
    first = _digest(make_demo_dataset(tmp_path / "a", seed=5, **kwargs))
    assert first == _digest(make_demo_dataset(tmp_path / "b", seed=5, **kwargs))
    assert first != _digest(make_demo_dataset(tmp_path / "c", seed=6, **kwargs))


def test_idempotent_reuses_complete_set(demo_root: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*.png")}
    start = time.perf_counter()
    again = make_demo_dataset(demo_root, seed=0, categories=("brick", "grass", "coffee"), **TINY)
    assert again == demo_root and time.perf_counter() - start < 1.0
    assert before == {p: p.stat().st_mtime_ns for p in demo_root.rglob("*.png")}


def test_incomplete_set_is_regenerated_on_overwrite(demo_copy: Path) -> None:
    next(demo_copy.rglob("*.png")).unlink()
    with pytest.raises(DatasetError, match="other parameters"):
        make_demo_dataset(demo_copy, seed=0, categories=("brick", "grass", "coffee"), **TINY)
    make_demo_dataset(demo_copy, seed=0, categories=("brick", "grass", "coffee"), overwrite=True, **TINY)
    assert len(list(demo_copy.rglob("*.png"))) == 3 * (2 + 2 + 4 + 4)


def test_other_parameters_need_overwrite(demo_copy: Path) -> None:
    with pytest.raises(DatasetError, match="overwrite=True"):
        make_demo_dataset(demo_copy, seed=1, categories=("brick",), **TINY)
    make_demo_dataset(demo_copy, seed=1, categories=("brick",), overwrite=True, **TINY)
    assert sorted(p.name for p in demo_copy.iterdir() if p.is_dir()) == ["brick"]
    assert not [p for p in demo_copy.parent.iterdir() if p.name.startswith(".zsad_demo")]


def test_never_touches_a_non_demo_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a demo set"):
        make_demo_dataset(tmp_path / "mine", overwrite=True, **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failure_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setitem(demo_module.PAINTERS, "hole", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_demo_dataset(tmp_path / "demo", categories=("brick",), **TINY)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments_are_explained(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Choose categories from"):
        make_demo_dataset(tmp_path / "x", categories=("marble",))
    with pytest.raises(DatasetError, match="image_size"):
        make_demo_dataset(tmp_path / "x", image_size=8)


def test_cli_writes_and_prints_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = main(["--root", str(tmp_path / "cli"), "--seed", "0", "--categories", "brick", "--image-size", "48",
                 "--n-train", "1", "--n-test-good", "1", "--n-test-defect", "2"])
    assert capsys.readouterr().out.strip() == str(root)
    assert (root / MANIFEST).is_file() and len(list(root.rglob("*.png"))) == 1 + 1 + 2 + 2


def test_default_set_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = make_demo_dataset(tmp_path / "full")
    assert time.perf_counter() - start < 15  # seconds on 2 CPU cores, including photo loading
    assert len([p for p in root.iterdir() if p.is_dir()]) == 5


def test_anomalib_mvtecad_reads_it_unchanged(demo_root: Path) -> None:
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=demo_root, category="brick", num_workers=0, train_batch_size=2, eval_batch_size=8)
    datamodule.prepare_data()  # must not try to download: the category folder exists
    datamodule.setup()
    assert len(datamodule.train_data) == TINY["n_train"]
    assert len(datamodule.test_data) == TINY["n_test_good"] + TINY["n_test_defect"]
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1:] == (3, 64, 64)
    assert batch.gt_mask.shape[1:] == (64, 64)
    assert int(batch.gt_label.sum()) == TINY["n_test_defect"]
    assert all((m.sum() > 0) == bool(y) for m, y in zip(batch.gt_mask, batch.gt_label, strict=True))


def test_anomalib_folder_reads_it_unchanged(demo_root: Path) -> None:
    from anomalib.data import Folder

    defects = sorted(DEFECT_TYPES)
    datamodule = Folder(
        name="brick",
        root=demo_root / "brick",
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects],
        mask_dir=[f"ground_truth/{d}" for d in defects],
        num_workers=0,
        val_split_mode="none",
    )
    datamodule.setup()
    assert datamodule.test_data.task.value == "segmentation"
    samples = datamodule.test_data.samples
    assert len(samples) == TINY["n_test_good"] + TINY["n_test_defect"]
    abnormal = samples[samples.label_index == 1]
    assert all(Path(m).stem == f"{Path(i).stem}_mask" and Path(m).parent.name == Path(i).parent.name
               for i, m in zip(abnormal.image_path, abnormal.mask_path, strict=True))


# ------------------------------------------------------------------ kill -9, concurrent runs, read-only targets
_CHILD = """
import sys
from anomalib_zsad.data.demo import make_demo_dataset
make_demo_dataset(sys.argv[1], categories=("brick",), image_size=32, n_train=100000, n_test_good=1, n_test_defect=1)
"""


def _temporaries(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-"))


def _start_writer(root: Path) -> tuple[subprocess.Popen, Path]:
    """A real generator process, caught while it writes (a huge set: it is still busy when we look)."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        temporaries = _temporaries(root.parent, root.name)
        if temporaries and any(temporaries[0].rglob("*.png")):
            return child, temporaries[0]
        assert child.poll() is None, "the writer exited early"
        time.sleep(0.05)
    child.kill()
    pytest.fail("the writer never started writing")


def test_kill_9_leftovers_are_removed_but_a_live_run_is_not(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    child, theirs = _start_writer(root)
    try:
        assert theirs.name.startswith(f".demo.tmp-{child.pid}-")
        # a concurrent run on the same root finishes first; the live writer's folder is not touched
        make_demo_dataset(root, categories=("brick",), **TINY)
        assert theirs.is_dir() and child.poll() is None
        os.kill(child.pid, signal.SIGKILL)
        child.wait()  # reaped: the pid is gone, as after `kill -9` in a shell
        assert theirs.is_dir()  # kill -9 skipped the clean-up
        again = make_demo_dataset(root, categories=("brick",), **TINY)  # the next run cleans it
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert again == root and not _temporaries(tmp_path, "demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_locked_temporary_is_kept_even_if_its_pid_looks_dead(tmp_path: Path) -> None:
    """Another pid namespace (container) sharing the folder: its lock, not its pid, tells it is alive."""
    import fcntl

    ours = tmp_path / ".demo.tmp-999999999-abcd1234"  # a pid that does not exist here
    ours.mkdir()
    fd = os.open(ours, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        make_demo_dataset(tmp_path / "demo", categories=("brick",), **TINY)
        assert ours.is_dir()
    finally:
        os.close(fd)
    make_demo_dataset(tmp_path / "demo", categories=("brick",), **TINY)
    assert not ours.exists()


def _unprivileged(function: Callable[[], str]) -> str:
    """``function()`` in a forked child that has dropped root (root ignores file permissions)."""
    if os.geteuid() != 0:
        return function()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            text = function()
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            text = f"UNEXPECTED {type(error).__name__}: {error}"
        os.write(write_end, text.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    return text


def test_read_only_target_is_one_line_error() -> None:
    parent = Path(tempfile.mkdtemp(prefix="zsad-readonly-"))  # under /tmp: reachable after dropping root
    try:
        parent.chmod(0o555)

        def api() -> str:
            try:
                make_demo_dataset(parent / "demo", categories=("brick",), **TINY)
            except DatasetError as error:
                return f"DatasetError: {error}"
            return "no error"

        def cli() -> str:
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                try:
                    main(["--root", str(parent / "demo"), "--categories", "brick"])
                except SystemExit as exit_:
                    return f"exit {exit_.code}: {stderr.getvalue()}"
            return "no exit"

        message = _unprivileged(api)
        assert message.startswith(f"DatasetError: Cannot write the demo set to '{parent / 'demo'}': Permission denied")
        assert "\n" not in message and "writable" in message
        printed = _unprivileged(cli)
        assert printed.startswith("exit 2: error: Cannot write the demo set") and printed.count("\n") == 1
        assert "Traceback" not in printed
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent)


def test_a_set_left_aside_by_a_killed_overwrite_is_put_back(demo_root: Path, tmp_path: Path) -> None:
    """kill -9 between moving the old set aside and renaming the new one in: the old set comes back."""
    aside = tmp_path / ".zsad_demo.old-999999999"  # above any pid_max: its writer is surely gone
    shutil.copytree(demo_root, aside)
    before = _digest(aside)
    root = make_demo_dataset(tmp_path / "zsad_demo", seed=0, categories=("brick", "grass", "coffee"), **TINY)
    assert not aside.exists() and _digest(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zsad_demo"]
