"""Offline demo data set in MVTec AD layout, generated from scikit-image's bundled photos.

Why: the project must run end to end (README job, integration tests, CI) without MVTec AD or
VisA, which cannot be downloaded here. This writes a tiny, deterministic set with synthetic
defects and exact masks that anomalib's ``MVTecAD`` and ``Folder`` datamodules read unchanged::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png      (0 / 255)
    <root>/.zsad_demo.json                                      (parameters; marks a complete set)

Generation is seeded per (seed, category), takes well under a second per category at the default
size, and is atomic: everything is written into a temporary sibling folder that is renamed to
``root`` only when complete, so a failure never leaves a half-written set behind. A process killed
outright (``kill -9``) cannot clean up; its temporary folder (``.<name>.tmp-<pid>-*``) is removed by
the next run once it is sure the folder is stale (see :func:`_remove_stale_temporaries`). A target
that cannot be written raises :class:`DatasetError` with a one-line reason.

Command line: ``python -m anomalib_zsad.data.demo --root datasets/zsad_demo --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_zsad.data._defects import PAINTERS
from anomalib_zsad.data.errors import DatasetError

try:
    import fcntl
except ImportError:  # Windows: no flock; stale temporaries are then left alone
    fcntl = None

MANIFEST = ".zsad_demo.json"
FORMAT_VERSION = 1
DEFECT_TYPES: tuple[str, ...] = tuple(PAINTERS)
# category -> (scikit-image loader name, RGB tint applied to grayscale photos)
TEXTURES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.0, 0.72, 0.6)),
    "grass": ("grass", (0.75, 1.0, 0.65)),
    "gravel": ("gravel", (0.95, 0.92, 0.85)),
    "tissue": ("immunohistochemistry", (1.0, 1.0, 1.0)),
    "coffee": ("coffee", (1.0, 1.0, 1.0)),
    "moon": ("moon", (0.9, 0.9, 1.0)),
}
DEFAULT_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel", "tissue", "coffee")

__all__ = ["DEFAULT_CATEGORIES", "DEFECT_TYPES", "TEXTURES", "is_demo_dataset", "make_demo_dataset", "main"]


def _load_texture(category: str) -> np.ndarray:
    """The category's source photo as float RGB in ``[0, 1]``."""
    import skimage.data

    loader, tint = TEXTURES[category]
    photo = np.asarray(getattr(skimage.data, loader)(), dtype=np.float64) / 255.0
    if photo.ndim == 2:
        photo = photo[..., None] * np.asarray(tint)
    return np.clip(photo[..., :3], 0.0, 1.0)


def _random_view(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop (45-75 % of the short side), rotated/flipped, resized and brightness-jittered."""
    height, width = texture.shape[:2]
    crop = int(rng.uniform(0.45, 0.75) * min(height, width))
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    view = np.rot90(texture[top : top + crop, left : left + crop], k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        view = view[:, ::-1]
    pil = Image.fromarray(_to_uint8(view)).resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(pil, dtype=np.float64) / 255.0 * rng.uniform(0.93, 1.07), 0.0, 1.0)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def sample_plan(params: dict) -> Iterator[tuple[str, str, int]]:
    """``(split, label folder, index in that folder)`` of every sample of one category, in the order
    the demo writers draw them: training goods, test goods, then the defects round-robin."""
    for split, n in (("train", params["n_train"]), ("test", params["n_test_good"])):
        for i in range(n):
            yield split, "good", i
    defects = params["defect_types"]
    counts = dict.fromkeys(defects, 0)
    for i in range(params["n_test_defect"]):
        defect = defects[i % len(defects)]
        yield "test", defect, counts[defect]
        counts[defect] += 1


def _write_category(out: Path, category: str, params: dict, textures: dict[str, np.ndarray]) -> int:
    """Write one category; return the number of files written."""
    rng = np.random.default_rng([params["seed"], zlib.crc32(category.encode())])
    size = params["image_size"]
    texture = textures[category]
    others = [name for name in textures if name != category] or [category]
    count = 0
    for split, label, index in sample_plan(params):
        name = f"{index:03d}"
        if label == "good":
            _save(_to_uint8(_random_view(texture, size, rng)), out / category / split / "good" / f"{name}.png")
            count += 1
            continue
        foreign = _random_view(textures[others[int(rng.integers(0, len(others)))]], size, rng)
        image, mask = PAINTERS[label](_random_view(texture, size, rng), rng, foreign)
        _save(_to_uint8(image), out / category / "test" / label / f"{name}.png")
        _save(mask.astype(np.uint8) * 255, out / category / "ground_truth" / label / f"{name}_mask.png")
        count += 2
    return count


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, params: dict | None = None) -> bool:
    """True if ``root`` holds a complete demo set (made with ``params``, if given)."""
    manifest = _read_manifest(root)
    if manifest is None or (params is not None and manifest.get("params") != params):
        return False
    return sum(1 for p in root.rglob("*.png")) == manifest.get("num_files")


def is_demo_dataset(root: str | Path) -> bool:
    """True if ``root`` holds a complete demo set, whatever parameters made it."""
    return _is_complete(Path(root))


def make_demo_dataset(
    root: str | Path = "datasets/zsad_demo",
    seed: int = 0,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    image_size: int = 128,
    n_train: int = 8,
    n_test_good: int = 4,
    n_test_defect: int = 6,
    defect_types: Sequence[str] = DEFECT_TYPES,
    overwrite: bool = False,
) -> Path:
    """Create (or re-use) the demo set at ``root`` and return ``root`` as an absolute path.

    Idempotent: if ``root`` already holds a complete set made with the same parameters it is
    returned untouched. A complete set made with *other* parameters, or a non-empty folder that
    is not a demo set, raises :class:`DatasetError` unless ``overwrite=True`` (demo sets only:
    a folder without the demo manifest is never deleted).

    Args:
        root: output folder; categories become its sub-folders (MVTec AD layout).
        seed: base seed; each category is seeded by ``(seed, crc32(category))``.
        categories: subset of :data:`TEXTURES` keys.
        image_size: side of the square images in pixels (>= 32).
        n_train, n_test_good, n_test_defect: images per category; defects are spread
            round-robin over ``defect_types`` (subset of :data:`DEFECT_TYPES`).
        overwrite: replace an existing demo set made with different parameters.
    """
    root = Path(root).expanduser().resolve()
    unknown = [c for c in categories if c not in TEXTURES]
    bad_defects = [d for d in defect_types if d not in PAINTERS]
    if unknown or bad_defects or not categories or not defect_types:
        msg = (
            f"Unknown demo categories {unknown} / defect types {bad_defects} (or an empty list). "
            f"Choose categories from {sorted(TEXTURES)} and defect types from {list(DEFECT_TYPES)}."
        )
        raise DatasetError(msg)
    if image_size < 32 or min(n_train, n_test_good, n_test_defect) < 0 or n_test_defect + n_test_good == 0:
        msg = "image_size must be >= 32 and the image counts non-negative (with at least one test image)."
        raise DatasetError(msg)
    params = {
        "version": FORMAT_VERSION,
        "seed": int(seed),
        "categories": list(categories),
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_test_good": int(n_test_good),
        "n_test_defect": int(n_test_defect),
        "defect_types": list(defect_types),
    }
    if _already_there(root, params, overwrite):
        return root

    try:
        tmp, lock = _make_temporary(root)
    except OSError as error:
        raise DatasetError(_cannot_write(root, error)) from error
    try:
        textures = {c: _load_texture(c) for c in categories}  # reading: its errors are not ours to reword
        try:
            num_files = sum(_write_category(tmp, c, params, textures) for c in categories)
            (tmp / MANIFEST).write_text(json.dumps({"params": params, "num_files": num_files}, indent=2))
            _swap_into_place(tmp, root, params)
        except OSError as error:
            raise DatasetError(_cannot_write(root, error)) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(lock)
    return root


def _already_there(root: Path, params: dict, overwrite: bool) -> bool:
    """True when ``root`` holds a complete set made with ``params`` (nothing to write). Otherwise the
    folder may be written (empty, missing, or an older demo set with ``overwrite``): its parent is
    made, leftovers of interrupted runs are removed; anything else raises :class:`DatasetError`
    before a file is written. Shared by the 2D and the 3D demo generators."""
    try:
        _remove_stale_temporaries(root)
        if _is_complete(root, params):
            return True
        is_demo = _read_manifest(root) is not None
        if root.exists() and any(root.iterdir()) and not (overwrite and is_demo):
            what = "a demo set made with other parameters" if is_demo else "files that are not a demo set"
            hint = "pass overwrite=True (--overwrite) or" if is_demo else "use"
            msg = f"'{root}' already contains {what}; {hint} another root."
            raise DatasetError(msg)
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(_cannot_write(root, error)) from error
    return False


def _cannot_write(root: Path, error: OSError) -> str:
    """One line naming the target and the operating system's reason (read-only, disk full, ...)."""
    reason = error.strerror or str(error)
    where = f" ('{error.filename}')" if error.filename and str(error.filename) != str(root) else ""
    return f"Cannot write the demo set to '{root}': {reason}{where}. Choose a writable folder with --root / root=."


# ---------------------------------------------------------------- temporary folders and their clean-up
# A run writes into ``.<name>.tmp-<pid>-<random>`` beside the target and holds an exclusive flock on
# that folder until it is renamed into place or removed. ``kill -9`` skips the ``finally`` that
# removes it; the next run removes such a folder only when BOTH its writer's pid is gone AND nobody
# holds its lock, so a concurrent run (alive: pid and lock) is never touched; a pid reused by an
# unrelated process only delays the clean-up. ``.<name>.old-<pid>`` (a set being replaced by
# ``overwrite=True``) is restored if the target is missing, else removed, once its pid is gone.
# Folders in the pre-pid format (``.<name>.tmp-<random>``) are removed when unlocked and a day old.
_LEGACY_STALE_SECONDS = 24 * 3600


def _make_temporary(root: Path) -> tuple[Path, int | None]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    return tmp, _try_lock(tmp)


def _try_lock(folder: Path) -> int | None:
    """Exclusive non-blocking flock on ``folder``: the open fd, or None if held elsewhere/unsupported."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a real pid: do not treat as dead
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    return True


def _remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove temporaries of *dead* earlier runs for ``root``; return what was removed (or restored).

    POSIX only (elsewhere nothing is removed: there is no safe liveness check).
    """
    if os.name != "posix" or fcntl is None or not root.parent.is_dir():
        return []
    tmp_prefix, old_prefix = f".{root.name}.tmp-", f".{root.name}.old-"
    removed = []
    for entry in sorted(root.parent.iterdir()):
        name = entry.name
        if not entry.is_dir() or entry.is_symlink() or not name.startswith((tmp_prefix, old_prefix)):
            continue
        if name.startswith(old_prefix):
            pid = name[len(old_prefix):]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if not root.exists() and _is_complete(entry):
                    entry.rename(root)  # killed mid-swap: put the previous set back
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            continue
        pid, _, rest = name[len(tmp_prefix):].partition("-")
        if pid.isdigit() and rest:
            if _pid_alive(int(pid)):
                continue
        else:  # pre-pid format: no owner known, go by age
            try:
                age = time.time() - entry.stat().st_mtime
            except OSError:
                continue
            if age < _LEGACY_STALE_SECONDS:
                continue
        lock = _try_lock(entry)
        if lock is None:  # a live writer holds it (e.g. another pid namespace)
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            _unlock(lock)
        removed.append(entry)
    return removed


def _swap_into_place(tmp: Path, root: Path, params: dict) -> None:
    """Rename ``tmp`` to ``root``; tolerate a concurrent writer that finished first."""
    old = None
    if root.exists() and any(root.iterdir()):  # overwrite of a demo set, checked by the caller
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        root.rename(old)
    try:
        os.replace(tmp, root)  # atomic; also replaces an empty directory
    except OSError:
        if not _is_complete(root, params):  # someone else won the race with the same parameters?
            if old is not None:
                old.rename(root)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point (``python -m anomalib_zsad.data.demo``)."""
    parser = argparse.ArgumentParser(prog="python -m anomalib_zsad.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="datasets/zsad_demo", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default=",".join(DEFAULT_CATEGORIES), help="comma-separated")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defect", type=int, default=6)
    parser.add_argument("--defect-types", default=",".join(DEFECT_TYPES), help="comma-separated")
    parser.add_argument("--overwrite", action="store_true", help="replace a demo set made with other parameters")
    args = parser.parse_args(argv)
    try:
        root = make_demo_dataset(
            root=args.root,
            seed=args.seed,
            categories=[c for c in args.categories.split(",") if c],
            image_size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_test_defect=args.n_test_defect,
            defect_types=[d for d in args.defect_types.split(",") if d],
            overwrite=args.overwrite,
        )
    except DatasetError as error:
        parser.exit(2, f"error: {error}\n")
    print(root)
    return root


if __name__ == "__main__":
    main()
