"""Make the M3DM parity set (``<out>/m3dm``) by running the unmodified official M3DM code on random weights.

Official code: https://github.com/nomewang/M3DM at 62b7f468aa006f6b348f09e02f85655f416c9d76. Export it with

    git --git-dir <mirror of nomewang/M3DM> archive 62b7f468aa006f6b348f09e02f85655f416c9d76 | tar -x -C /tmp/m3dm_off
    python tools/parity/make_m3dm_set.py --src /tmp/m3dm_off --out /tmp/remade --seed 100

The official ``main.py`` runs as ``__main__`` with the README's full-setting command plus ``--num_group 256
--group_size 64`` (the set's README, "How they were made"); everything else has its argparse default. Seeds:
``--seed S`` gives weights seed ``S`` (``m3dm_weights.py``, copied into the set with its manifest) and data
seed ``S + 2`` (the synthetic MVTec 3D-AD class ``bagel``: 2 train, 1 good and 1 ``hole`` test sample).
``--inputs-from SET`` takes the raw samples (RGB, organized xyz, GT) of an existing set instead of
synthesising them: the shared set's synthesis recipe is not shipped, so ``--seed 100 --inputs-from
../shared/parity/m3dm`` is the way to remake the shared set (its data seed is then the set's).

Run-time patches only (no official file is edited; README §9 of the set):

* ``pointnet2_ops.pointnet2_utils`` and ``knn_cuda`` (CUDA extensions) are stub modules with exact CPU
  versions written here: farthest point sampling with ``sampling_gpu.cu``'s rules (start 0, running
  distance 1e10, points with ``|p|² <= 1e-3`` skipped, float32 ``dx·dx + dy·dy + dz·dz``, first maximum)
  and kNN with KNN_CUDA's (squared distance accumulated over x, y, z in float32, stable ascending order,
  0-based int64 indices). Both are checked against literal single-thread transcriptions of the kernels on
  small random clouds (``meta['cpu_replacement_checks']``);
* ``timm.create_model(pretrained=True)`` gets ``pretrained_cfg_overlay=dict(file=<local DINO weights>)``;
* ``dataset.mvtec3d_classes`` -> ``['bagel']``; on a CUDA host ``torch.cuda.is_available`` -> False;
* observation-only wrappers, which return what the wrapped code returns.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_run as orun

METHOD = "m3dm"
COMMIT = "62b7f468aa006f6b348f09e02f85655f416c9d76"
ROOT = Path(__file__).resolve().parents[2]
SHARED_WEIGHTS = ROOT.parent / "shared" / "parity" / "m3dm" / "m3dm_weights.py"
OFFICIAL_FILES = ["main.py", "m3dm_runner.py", "dataset.py", "feature_extractors/features.py",
                  "feature_extractors/multiple_features.py", "models/models.py", "models/pointnet2_utils.py",
                  "models/feature_fusion.py", "utils/utils.py", "utils/mvtec3d_util.py", "utils/au_pro_util.py"]
NUM_GROUP, GROUP_SIZE, ROW_STRIDE = 256, 64, 13
ARGV = ["--method_name", "DINO+Point_MAE+Fusion", "--use_uff", "--memory_bank", "multiple",
        "--rgb_backbone_name", "vit_base_patch8_224_dino", "--xyz_backbone_name", "Point_MAE",
        "--fusion_module_path", "checkpoints/checkpoint-0.pth", "--num_group", str(NUM_GROUP),
        "--group_size", str(GROUP_SIZE)]
CLASS, DEFECT, RAW = "bagel", "hole", 256
MODALITIES = ("xyz", "rgb", "fusion")


# ----------------------------------------------------------------------------- synthetic data
def _smooth_field(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A low-frequency field in [-1, 1]: cubic zoom of 8 x 8 uniform noise."""
    from scipy.ndimage import zoom

    field = zoom(rng.uniform(-1.0, 1.0, (8, 8)), size / 8, order=3)
    return field / max(np.abs(field).max(), 1e-12)


def make_sample(rng: np.random.RandomState, dent: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One 256 x 256 sample: uint8 RGB, float32 organized xyz (metres, background exactly 0), uint8 GT."""
    rows, cols = np.mgrid[0:RAW, 0:RAW].astype(np.float64)
    cy, cx = RAW / 2 + rng.uniform(-6, 6), RAW / 2 + rng.uniform(-6, 6)
    ay, ax = rng.uniform(36, 44), rng.uniform(36, 44)
    radius = np.sqrt(((rows - cy) / ay) ** 2 + ((cols - cx) / ax) ** 2)
    inside = radius < 1.0
    relief = _smooth_field(rng, RAW)
    height = 0.012 * np.sqrt(np.clip(1.0 - radius**2, 0.0, None)) + 0.0008 * relief * inside
    depth = np.zeros((RAW, RAW))
    gt = np.zeros((RAW, RAW), np.uint8)
    spot = np.zeros((RAW, RAW))
    if dent:
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5)
        dy, dx = cy + dist * ay * np.sin(angle), cx + dist * ax * np.cos(angle)
        spot = np.exp(-((rows - dy) ** 2 + (cols - dx) ** 2) / (2 * 6.0**2))
        depth = 0.003 * spot
        gt[(depth > 0.25 * 0.003) & inside] = 255
    base = rng.uniform(0.395, 0.4)
    z = base - height + depth + rng.normal(0, 2e-5, (RAW, RAW))
    x = (cols - RAW / 2) * 4e-4 + rng.uniform(-2e-5, 2e-5, (RAW, RAW))
    y = (rows - RAW / 2) * 4e-4 + rng.uniform(-2e-5, 2e-5, (RAW, RAW))
    xyz = np.stack([x, y, z], -1) * inside[..., None]
    colour = rng.uniform(120, 200, 3)
    shade = (1.0 + 0.15 * relief)[..., None] * (1.0 - 0.5 * spot)[..., None]
    rgb = colour * shade + rng.normal(0, 4.0, (RAW, RAW, 3))
    rgb = np.clip(np.round(rgb), 0, 255) * inside[..., None]
    return rgb.astype(np.uint8), xyz.astype(np.float32), gt


def synthesise(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``{rel rgb path: (rgb, xyz, gt or None)}`` of the class: train/good x2, test/good x1, test/hole x1."""
    rng = np.random.RandomState(seed)
    samples = {}
    for rel, dent in ((f"{CLASS}/train/good/rgb/000.png", False), (f"{CLASS}/train/good/rgb/001.png", False),
                      (f"{CLASS}/test/good/rgb/000.png", False), (f"{CLASS}/test/{DEFECT}/rgb/000.png", True)):
        rgb, xyz, gt = make_sample(rng, dent)
        samples[rel] = (rgb, xyz, gt if dent else None)
    return samples


def from_set(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    inputs = torch.load(folder / "inputs.pt", weights_only=False)
    samples = {}
    for row, rel in enumerate(inputs["rel_paths"]):
        gt = inputs["raw_gt_uint8"][row].numpy()
        samples[rel] = (inputs["raw_rgb_uint8"][row].numpy(), inputs["raw_xyz_float32"][row].numpy(),
                        gt if "/test/" in rel and "/good/" not in rel else None)
    return samples


def write_data(root: Path, samples: dict) -> None:
    import tifffile
    from PIL import Image

    for rel, (rgb, xyz, gt) in samples.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
        tiff = root / rel.replace("/rgb/", "/xyz/").replace(".png", ".tiff")
        tiff.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tiff, xyz)
        if gt is not None:
            gt_path = root / rel.replace("/rgb/", "/gt/")
            gt_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gt, mode="L").save(gt_path)


# ----------------------------------------------------------------------------- CPU versions of the kernels
def furthest_point_sample(xyz: torch.Tensor, m: int, ties: list | None = None) -> torch.Tensor:
    """``pointnet2_ops`` ``furthest_point_sample``: int32 ``[B, m]`` with ``sampling_gpu.cu``'s rules."""
    xyz = xyz.float()
    batch, n, _ = xyz.shape
    out = torch.zeros(batch, m, dtype=torch.int32)
    for b in range(batch):
        x, y, z = xyz[b, :, 0], xyz[b, :, 1], xyz[b, :, 2]
        skip = (x * x + y * y + z * z) <= 1e-3
        temp = torch.full((n,), 1e10, dtype=torch.float32)
        old = 0
        for j in range(1, m):
            dx, dy, dz = x - x[old], y - y[old], z - z[old]
            d = dx * dx + dy * dy + dz * dz
            temp = torch.where(skip, temp, torch.minimum(d, temp))
            candidates = torch.where(skip, torch.tensor(-1.0), temp)
            best = candidates.max()
            hits = torch.nonzero(candidates == best)[:, 0]
            if ties is not None and len(hits) > 1:
                ties.append(len(hits))
            old = int(hits[0])
            out[b, j] = old
    return out


def gather_operation(features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``pointnet2_ops`` ``gather_operation``: ``features [B, C, N]``, ``idx [B, m]`` -> ``[B, C, m]``."""
    index = idx.long()[:, None, :].expand(-1, features.shape[1], -1)
    return torch.gather(features, 2, index)


class KNN(torch.nn.Module):
    """``knn_cuda.KNN`` on the CPU: ``forward(ref, query)`` -> ``(dist [B, Q, k], idx [B, Q, k] int64)``."""

    def __init__(self, k: int, transpose_mode: bool = False) -> None:
        super().__init__()
        self.k, self.transpose_mode = k, transpose_mode

    def forward(self, ref: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.transpose_mode:
            ref, query = ref.transpose(1, 2), query.transpose(1, 2)
        ref, query = ref.float().contiguous(), query.float().contiguous()
        dists, idxs = [], []
        for start in range(0, query.shape[1], 64):
            q = query[:, start:start + 64]
            d = None
            for c in range(3):
                diff = ref[:, None, :, c] - q[:, :, None, c]
                d = diff * diff if d is None else d + diff * diff
            values, order = torch.sort(d, dim=-1, stable=True)
            dists.append(values[..., :self.k].sqrt())
            idxs.append(order[..., :self.k])
        dist, idx = torch.cat(dists, 1), torch.cat(idxs, 1)
        if not self.transpose_mode:
            dist, idx = dist.transpose(1, 2), idx.transpose(1, 2)
        return dist, idx


def literal_fps(points: np.ndarray, m: int) -> list[int]:
    """Single-thread transcription of ``furthest_point_sampling_kernel`` (float32 throughout)."""
    pts = points.astype(np.float32)
    temp = np.full(len(pts), 1e10, np.float32)
    idxs, old = [0], 0
    for _ in range(1, m):
        best, besti = np.float32(-1), 0
        x1, y1, z1 = pts[old]
        for k in range(len(pts)):
            x2, y2, z2 = pts[k]
            if x2 * x2 + y2 * y2 + z2 * z2 <= np.float32(1e-3):
                continue
            d = np.float32(np.float32((x2 - x1) * (x2 - x1)) + np.float32((y2 - y1) * (y2 - y1)))
            d = np.float32(d + np.float32((z2 - z1) * (z2 - z1)))
            d2 = min(d, temp[k])
            temp[k] = d2
            if d2 > best:
                best, besti = d2, k
        old = besti
        idxs.append(old)
    return idxs


def literal_knn(ref: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Per query: float32 squared distances over c = 0, 1, 2, then an insertion sort (stable) of the k first."""
    out = []
    for q in query.astype(np.float32):
        dist = []
        for i, r in enumerate(ref.astype(np.float32)):
            acc = np.float32(0)
            for c in range(3):
                diff = np.float32(r[c] - q[c])
                acc = np.float32(acc + np.float32(diff * diff))
            dist.append((acc, i))
        best: list = []
        for item in dist:  # insertion into a sorted list of k, a new item after equal ones
            pos = len(best)
            while pos > 0 and best[pos - 1][0] > item[0]:
                pos -= 1
            best.insert(pos, item)
            del best[k:]
        out.append([i for _, i in best])
    return np.array(out)


def check_replacements() -> dict:
    rng = np.random.RandomState(0)
    clouds = [rng.uniform(-1, 1, (400, 3)), rng.uniform(-1, 1, (400, 3)), rng.uniform(-1, 1, (400, 3))]
    clouds[2][:25] *= 0.01  # inside the 1e-3 ball: never selected
    for cloud in clouds:
        ours = furthest_point_sample(torch.tensor(cloud, dtype=torch.float32)[None], 48)[0].tolist()
        assert ours == literal_fps(cloud, 48), "FPS replacement differs from the literal kernel loop"
    refs = [rng.uniform(-1, 1, (300, 3)) for _ in range(3)] + [np.repeat(rng.uniform(-1, 1, (100, 3)), 3, 0)]
    for n, ref in enumerate(refs):
        k = 7 if n == 3 else 16
        query = ref[rng.choice(len(ref), 20, replace=False)] + (0 if n == 3 else rng.normal(0, 0.01, (20, 3)))
        ours = KNN(k, transpose_mode=True)(torch.tensor(ref, dtype=torch.float32)[None],
                                           torch.tensor(query, dtype=torch.float32)[None])[1][0].numpy()
        assert (ours == literal_knn(ref, query, k)).all(), "kNN replacement differs from the literal insertion sort"
    return OrderedDict(
        fps_vs_literal_kernel_loop="identical indices on 3 random clouds (400 pts -> 48; one with 25 pts inside "
                                   "the 1e-3 magnitude ball)",
        knn_vs_literal_insertion_sort="identical indices on 4 clouds (k=16; and k=7 with triplicated points, i.e. "
                                      "exact ties)")


# ----------------------------------------------------------------------------- helpers
def load_weights_module(path: Path):
    spec = importlib.util.spec_from_file_location("m3dm_weights_gen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coo(matrix) -> dict:
    import scipy.sparse

    m = scipy.sparse.coo_matrix(matrix)
    return {"components_row": torch.from_numpy(m.row.astype(np.int32)),
            "components_col": torch.from_numpy(m.col.astype(np.int32)),
            "components_val": torch.from_numpy(np.asarray(m.data)), "components_dtype": str(m.data.dtype)}


def main() -> None:  # noqa: C901
    parser = orun.generator_parser(__doc__, METHOD, COMMIT)
    parser.add_argument("--weights-module", type=Path, default=SHARED_WEIGHTS,
                        help="m3dm_weights.py (the random-weight generator shipped with the shared set)")
    parser.add_argument("--inputs-from", type=Path, default=None,
                        help="take the raw samples of this set's inputs.pt instead of synthesising them")
    args = parser.parse_args()
    out, timings, start = orun.start_set(args, METHOD)
    src = args.src.resolve()
    work, copy = orun.work_dir(METHOD, src, ignore=("figures",))
    patches_note: list[str] = []

    with orun.timed(timings, "verify_cpu_replacements"):
        replacement_checks = check_replacements()

    weights_seed = args.seed
    if args.inputs_from is not None:
        data_seed = int(torch.load(args.inputs_from / "inputs.pt", weights_only=False)["meta"]["data_seed"])
        samples = from_set(args.inputs_from)
    else:
        data_seed = args.seed + 2
        samples = synthesise(data_seed)
    data_root = work / "data"
    write_data(data_root, samples)

    with orun.timed(timings, "weights"):
        weights = load_weights_module(args.weights_module)
        paths, manifest, sds = weights.write(weights_seed, str(copy))
        shutil.copyfile(args.weights_module, out / "m3dm_weights.py")
        (out / "weights_manifest.json").write_text(json.dumps(manifest, indent=1))
    (copy / "results").mkdir(exist_ok=True)

    # stub modules of the CUDA extensions
    ties: list[int] = []
    pn2 = types.ModuleType("pointnet2_ops")
    pn2_utils = types.ModuleType("pointnet2_ops.pointnet2_utils")
    pn2_utils.furthest_point_sample = lambda xyz, m: furthest_point_sample(xyz, m, ties)
    pn2_utils.gather_operation = gather_operation
    pn2.pointnet2_utils = pn2_utils
    knn_mod = types.ModuleType("knn_cuda")
    knn_mod.KNN = KNN
    sys.modules.update({"pointnet2_ops": pn2, "pointnet2_ops.pointnet2_utils": pn2_utils, "knn_cuda": knn_mod})
    patches_note += [
        ("stub module pointnet2_ops.pointnet2_utils: furthest_point_sample and gather_operation are exact CPU "
         "re-implementations of the CUDA kernels (make_m3dm_set.py furthest_point_sample/gather_operation)"),
        ("stub module knn_cuda: KNN is an exact CPU re-implementation of unlimblue/KNN_CUDA (squared distances, "
         "stable k-smallest, 0-based indices)"),
        ("timm.create_model(pretrained=True): pretrained_cfg_overlay=dict(file=<local DINO-format random weights>) "
         "instead of downloading dino_vitbase8_pretrain.pth (timm loads and filters it through its normal "
         "pretrained path)"),
        "dataset.mvtec3d_classes -> ['bagel'] (main.py loops over the class list; only the synthetic class exists)",
    ]

    os.chdir(copy)
    sys.path.insert(0, str(copy))
    import dataset as off_dataset
    import sklearn.linear_model
    import sklearn.random_projection
    import timm
    import timm.layers
    from feature_extractors import features as off_features
    from feature_extractors import multiple_features as off_multi

    from models import feature_fusion as off_fusion

    state: dict = {"phase": None, "counts": {"fit": 0, "late": 0, "test": 0}, "drops": [], "ids": {}}
    calls: list = []
    test: list = []
    late_single: OrderedDict = OrderedDict()
    coreset: OrderedDict = OrderedDict()
    record: dict = {"rgb": {}, "gt": [], "labels": [], "svm_inputs": [], "fusion_in": None, "projections": []}
    result: dict = {}

    def phase_wrapper(phase):
        def make(orig):
            def wrapper(self, sample, *a, **k):
                state["phase"], state["sample"] = phase, state["counts"][phase]
                state["counts"][phase] += 1
                state["features"] = self
                if phase == "test":
                    record["gt"].append(a[0].clone())
                    record["labels"].append(int(a[1]))
                    test.append(OrderedDict())
                elif phase == "late":
                    late_single[state["sample"]] = OrderedDict()
                if phase != "late":  # the late pass re-reads the train samples
                    record["rgb"][(phase, state["sample"])] = sample[0][0].clone()
                return orig(self, sample, *a, **k)
            return wrapper
        return make

    def features_call(orig):
        def wrapper(self, rgb, xyz):
            state["drops"] = []
            res = orig(self, rgb, xyz)
            _, _, center, ori_idx, center_idx, interp = res
            scale = torch.ones(12, 2, dtype=torch.float32)
            prob = torch.zeros(12, 2, dtype=torch.float64)
            for n, (block, p, factor) in enumerate(state["drops"]):
                scale[block, n % 2] = factor
                prob[block, n % 2] = p
            call = OrderedDict(phase=state["phase"], sample=state["sample"], n_points=int(xyz.shape[2]),
                               center=center[0].clone(), center_idx=center_idx[0].to(torch.int32).clone(),
                               ori_idx=ori_idx[0].to(torch.int32).clone(), droppath_scale=scale,
                               droppath_prob=prob)
            if state["phase"] == "test":
                call["rgb_fmap_ch8"] = res[0][0][0, ::8].clone()
                call["xyz_fmap_ch2"] = res[1][0][0, ::2].clone()
                call["interp_pt8_ch8"] = interp[0, ::8, ::8].clone()
            calls.append(call)
            return res
        return wrapper

    def drop_path_forward(orig):
        def wrapper(self, x):
            y = orig(self, x)
            if self.drop_prob == 0.0 or not self.training:
                factor = 1.0
            elif not bool(y.any()):
                factor = 0.0
            else:
                keep = 1 - self.drop_prob
                r = x.new_ones(()).div_(keep)
                assert torch.equal(y, x * r), "DropPath kept a branch but did not scale it by 1/keep"
                factor = float(r)
            block = state["ids"].get(id(self))
            if block is not None:
                state["drops"].append((block, float(self.drop_prob), factor))
            return y
        return wrapper

    def feature_fusion(orig):
        def wrapper(self, xyz_feature, rgb_feature):
            record["fusion_in"] = rgb_feature[0].clone()
            return orig(self, xyz_feature, rgb_feature)
        return wrapper

    def compute_s_s_map(orig):
        def wrapper(self, xyz_patch, rgb_patch, fusion_patch, *a, **k):
            entry = test[-1]
            entry["xyz_patch_sub"] = xyz_patch[::ROW_STRIDE, ::2].clone()
            entry["rgb_patch_sub"] = rgb_patch[::7, ::2].clone()
            entry["fusion_patch_sub"] = fusion_patch[::ROW_STRIDE, ::4].clone()
            entry["fusion_rgb_in_sub"] = record["fusion_in"][::ROW_STRIDE, ::4].clone()
            entry["single"] = OrderedDict()
            res = orig(self, xyz_patch, rgb_patch, fusion_patch, *a, **k)
            entry["fused_input_s"] = record["svm_inputs"][-2].clone().float()
            entry["score"] = torch.as_tensor(self.image_preds[-1]).clone()
            entry["s_map"] = torch.as_tensor(self.predictions[-1]).clone()
            return res
        return wrapper

    def single_map(orig):
        def wrapper(self, patch, dist, feature_map_dims, modal="xyz"):
            s, s_map = orig(self, patch, dist, feature_map_dims, modal=modal)
            lib = {"xyz": self.patch_xyz_lib, "rgb": self.patch_rgb_lib, "fusion": self.patch_fusion_lib}[modal]
            min_val, min_idx = torch.min(dist, dim=1)
            s_idx = int(torch.argmax(min_val))
            _, nn_idx = torch.topk(torch.cdist(lib[min_idx[s_idx]].unsqueeze(0), lib), k=self.n_reweight,
                                   largest=False)
            m_star_knn = torch.linalg.norm(patch[s_idx].unsqueeze(0) - lib[nn_idx[0, 1:]], dim=1)
            if state["phase"] == "test":
                test[-1]["single"][modal] = OrderedDict(
                    min_val=min_val.clone(), min_idx=min_idx.to(torch.int32), s_idx=s_idx, nn_idx=nn_idx[0].clone(),
                    m_star_knn=m_star_knn.clone(), s=s.clone(), s_map=s_map[0].clone(), dims=tuple(feature_map_dims))
            else:
                late_single[state["sample"]][modal] = OrderedDict(s=s.clone(), min_val=min_val.clone(), s_idx=s_idx,
                                                                  nn_idx=nn_idx[0].clone())
            return s, s_map
        return wrapper

    def run_coreset(orig):
        def wrapper(self):
            libs = {m: torch.cat(getattr(self, f"patch_{m}_lib"), 0) for m in MODALITIES}
            state["coreset_order"] = list(MODALITIES)
            res = orig(self)
            result["memory_banks"] = OrderedDict((m, getattr(self, f"patch_{m}_lib").clone()) for m in MODALITIES)
            result["normalization"] = OrderedDict((f"{m}_{s}", float(getattr(self, f"{m}_{s}")))
                                                  for m in MODALITIES for s in ("mean", "std"))
            stats = OrderedDict((f"{m}_lib_rows", int(libs[m].shape[0])) for m in MODALITIES)
            stats["mean_xyz_lib"] = float(torch.mean(libs["xyz"]))
            stats["std_rgb_lib"] = float(torch.std(libs["rgb"]))
            stats["mean_rgb_lib"] = float(torch.mean(libs["rgb"]))
            stats["std_xyz_lib"] = float(torch.std(libs["xyz"]))
            stats["mean_fusion_lib"] = float(torch.mean(libs["fusion"]))
            stats["std_fusion_lib"] = float(torch.std(libs["fusion"]))
            result["lib_stats"] = stats
            return res
        return wrapper

    def coreset_idx(orig):
        def wrapper(self, z_lib, n=1000, eps=0.90, *a, **k):
            record["projections"] = []
            idx = orig(self, z_lib, n, eps, *a, **k)
            name = state["coreset_order"][len(coreset)]
            transformer, projected = record["projections"][-1]
            entry = OrderedDict(n=int(n), eps=float(eps), lib_rows=int(z_lib.shape[0]), n_features=int(z_lib.shape[1]),
                                idx=idx.clone(), n_components=int(transformer.n_components_),
                                density=float(transformer.density_))
            entry.update(coo(transformer.components_))
            entry["projected_dtype"] = str(projected.dtype)
            if name != "fusion":
                z = torch.tensor(projected)
                entry["projected_fp16"] = z.half()
                entry["first_min_dist_fp16"] = torch.linalg.norm(z - z[0:1], dim=1, keepdims=True).half()
            coreset[name] = entry
            return idx
        return wrapper

    class RecordingProjection(sklearn.random_projection.SparseRandomProjection):
        def fit_transform(self, x, y=None, **fit_params):
            projected = super().fit_transform(x, y, **fit_params)
            record["projections"].append((self, np.array(projected, copy=True)))
            return projected

    def score_samples(orig):
        def wrapper(self, x):
            record["svm_inputs"].append(torch.as_tensor(np.asarray(x)).clone())
            return orig(self, x)
        return wrapper

    def late_fusion(orig):
        def wrapper(self):
            res = orig(self)
            result["late"] = OrderedDict(single=late_single, s_lib=self.s_lib.clone(), s_map_lib=self.s_map_lib.clone())
            fusers = OrderedDict()
            for name, fuser in (("detect", self.detect_fuser), ("seg", self.seg_fuser)):
                fusers[name] = OrderedDict(coef=torch.from_numpy(fuser.coef_.copy()),
                                           offset=torch.from_numpy(np.asarray(fuser.offset_).copy()),
                                           n_iter=int(fuser.n_iter_), t=float(fuser.t_),
                                           params=OrderedDict(sorted(fuser.get_params().items())))
            result["fusers"] = fusers
            return res
        return wrapper

    def metrics(orig):
        def wrapper(self):
            res = orig(self)
            result["metrics"] = OrderedDict(image_rocauc=float(self.image_rocauc), pixel_rocauc=float(self.pixel_rocauc),
                                            au_pro=float(self.au_pro), image_preds=np.array(self.image_preds),
                                            image_labels=np.array(self.image_labels).reshape(-1))
            return res
        return wrapper

    def create_model(orig):
        def wrapper(*a, **k):
            if k.get("pretrained"):
                k["pretrained_cfg_overlay"] = {"file": paths["dino"]}
            return orig(*a, **k)
        return wrapper

    def features_init(orig):
        def wrapper(self, *a, **k):
            orig(self, *a, **k)
            for name, module in self.deep_feature_extractor.xyz_backbone.named_modules():
                if isinstance(module, timm.layers.DropPath):
                    state["ids"][id(module)] = int(name.split(".")[2])  # blocks.blocks.<i>.drop_path
            # every tensor of the three modules is the generated one (the official loaders are strict=False);
            # checked here, before the training-mode forwards update the BatchNorm running statistics
            check = OrderedDict()
            for key, module, tag in (("rgb_backbone", self.deep_feature_extractor.rgb_backbone, "dino"),
                                     ("xyz_backbone", self.deep_feature_extractor.xyz_backbone, "pointmae"),
                                     ("fusion", self.fusion, "uff")):
                expected = {k: v for k, v in sds[tag].items() if not k.startswith("module.")}
                sd = {k: v for k, v in module.state_dict().items()
                      if k in expected or not k.endswith("num_batches_tracked")}
                assert set(sd) == set(expected), f"{key}: keys differ"
                bad = [k for k in sd if not torch.equal(sd[k], expected[k])]
                assert not bad, f"{key}: {bad[:5]} differ from the generated weights"
                check[key] = f"all {len(sd)} tensors equal to the generated weights"
            check["training_mode"] = {"rgb_backbone": self.deep_feature_extractor.rgb_backbone.training,
                                      "xyz_backbone": self.deep_feature_extractor.xyz_backbone.training,
                                      "fusion": self.fusion.training}
            state["weights_check"] = check
        return wrapper

    dataset_orders: dict = {}

    def load_dataset(split):
        def make(orig):
            def wrapper(self):
                res = orig(self)
                dataset_orders[split] = [os.path.relpath(p[0], data_root) for p in res[0]]
                return res
            return wrapper
        return make

    patches = [(timm, "create_model", create_model), (off_dataset, "mvtec3d_classes", lambda _o: lambda: [CLASS]),
               (off_dataset.TrainDataset, "load_dataset", load_dataset("train")),
               (off_dataset.TestDataset, "load_dataset", load_dataset("test")),
               (off_features.Features, "__call__", features_call),
               (off_multi.TripleFeatures, "add_sample_to_mem_bank", phase_wrapper("fit")),
               (off_multi.TripleFeatures, "add_sample_to_late_fusion_mem_bank", phase_wrapper("late")),
               (off_multi.TripleFeatures, "predict", phase_wrapper("test")),
               (off_multi.TripleFeatures, "compute_s_s_map", compute_s_s_map),
               (off_multi.TripleFeatures, "compute_single_s_s_map", single_map),
               (off_multi.TripleFeatures, "run_coreset", run_coreset),
               (off_features.Features, "get_coreset_idx_randomp", coreset_idx),
               (off_features.Features, "run_late_fusion", late_fusion),
               (off_features.Features, "calculate_metrics", metrics),
               (off_fusion.FeatureFusionBlock, "feature_fusion", feature_fusion),
               (timm.layers.DropPath, "forward", drop_path_forward),
               (sklearn.random_projection, "SparseRandomProjection", lambda _o: RecordingProjection),
               (sklearn.linear_model.SGDOneClassSVM, "score_samples", score_samples),
               (off_features.Features, "__init__", features_init),
               *orun.cpu_only_patches(patches_note)]
    patches_note.append(
        "observation-only wrappers (return the wrapped results unchanged): Features.__call__, "
        "TripleFeatures.add_sample_to_mem_bank/add_sample_to_late_fusion_mem_bank/predict (record the phase and "
        "sample), compute_single_s_s_map, compute_s_s_map, run_coreset, get_coreset_idx_randomp, run_late_fusion, "
        "calculate_metrics, FeatureFusionBlock.feature_fusion, TrainDataset/TestDataset.load_dataset (file order), "
        "SGDOneClassSVM.score_samples (its input), timm DropPath.forward (records whether each residual branch was "
        "dropped), Features.__init__ (maps the DropPath modules to their blocks, checks the loaded weights), "
        "features.random_projection.SparseRandomProjection (a subclass recording components_ and the projected "
        "library)")

    argv = [*ARGV, "--dataset_path", str(data_root)]
    with orun.timed(timings, "official_main_py"), orun.observed(patches, work / "main.log"):
        orun.run_main(copy / "main.py", argv)

    feats = state["features"]
    check = state["weights_check"]

    # inputs.pt in loader order (train sorted, test by os.listdir)
    rel_paths = dataset_orders["train"] + dataset_orders["test"]
    split = ["train"] * len(dataset_orders["train"]) + ["test"] * len(dataset_orders["test"])
    raw_gt = [samples[r][2] if samples[r][2] is not None else np.zeros((RAW, RAW), np.uint8) for r in rel_paths]
    rgb_rows = [record["rgb"][("fit", i)] for i in range(len(dataset_orders["train"]))]
    rgb_rows += [record["rgb"][("test", i)] for i in range(len(dataset_orders["test"]))]
    listdir = []
    for rel in dataset_orders["test"]:
        kind = rel.split("/")[2]
        if kind not in listdir:
            listdir.append(kind)
    inputs = OrderedDict(
        raw_rgb_uint8=torch.from_numpy(np.stack([samples[r][0] for r in rel_paths])),
        raw_xyz_float32=torch.from_numpy(np.stack([samples[r][1] for r in rel_paths])),
        raw_gt_uint8=torch.from_numpy(np.stack(raw_gt)), split=split, rel_paths=rel_paths,
        rgb=torch.stack(rgb_rows), gt_masks=torch.stack([g[0] for g in record["gt"]]).to(torch.uint8),
        labels=torch.tensor(record["labels"], dtype=torch.int64),
        meta=OrderedDict(data_seed=data_seed, raw_size=RAW, class_name=CLASS, defect_type=DEFECT,
                         test_listdir_order=listdir))
    # the resized clouds are reproduced by nearest resizing of the raw clouds (what the set promises)
    from utils.mvtec3d_util import resize_organized_pc
    for row, rel in enumerate(rel_paths):
        resized = resize_organized_pc(inputs["raw_xyz_float32"][row].numpy())
        nonzero = int(torch.all(resized.reshape(3, -1).T != 0, dim=1).sum())
        phase_calls = [c for c in calls if (c["phase"] == "test") == (split[row] == "test")]
        index = row if split[row] == "train" else row - len(dataset_orders["train"])
        assert all(c["n_points"] == nonzero for c in phase_calls if c["sample"] == index), rel

    args_ns = feats.args
    meta = OrderedDict(
        n_train=len(dataset_orders["train"]), n_test=len(dataset_orders["test"]), num_group=NUM_GROUP,
        group_size=GROUP_SIZE, image_size=int(args_ns.img_size),
        lambdas={f"{m}_{k}": float(getattr(args_ns, f"{m}_{k}_lambda")) for k in ("s", "smap") for m in MODALITIES},
        f_coreset=float(args_ns.f_coreset), coreset_eps=float(args_ns.coreset_eps), n_reweight=int(feats.n_reweight),
        ocsvm_nu=float(args_ns.ocsvm_nu), ocsvm_maxiter=int(args_ns.ocsvm_maxiter), blur_radius=int(feats.blur.radius),
        official_commit=COMMIT,
        official_file_sha256=OrderedDict((f, orun.sha256(src / f)) for f in OFFICIAL_FILES),
        main_argv=" ".join(["main.py", *ARGV, "--dataset_path", "<root>"]),
        weights_seed=weights_seed, data_seed=data_seed, weights_generator="m3dm_weights.py (copied into the set)",
        weights_check=check, cpu_replacement_checks=replacement_checks, fps_exact_ties_in_run=len(ties),
        env=orun.environment(("timm", "sklearn", "tifffile", "pandas")), patches=patches_note, row_stride=ROW_STRIDE)
    env = OrderedDict((k, meta["env"][k]) for k in ("torch", "numpy", "python", "num_threads", "timm", "sklearn",
                                                    "scipy", "PIL", "torchvision", "tifffile", "pandas"))
    meta["env"] = env
    outputs = OrderedDict(calls=calls, test=test, memory_banks=result["memory_banks"],
                          normalization=result["normalization"], lib_stats=result["lib_stats"], coreset=coreset,
                          late=result["late"], fusers=result["fusers"], metrics=result["metrics"], meta=meta)
    timings["total"] = round(time.time() - start, 2)
    info = OrderedDict(timings_s=timings, patches=patches_note, cpu_replacement_checks=replacement_checks,
                       fps_exact_ties_in_run=len(ties), src="official", official_commit=COMMIT,
                       official_file_sha256=meta["official_file_sha256"], weights_seed=weights_seed,
                       data_seed=data_seed, inputs_from=str(args.inputs_from) if args.inputs_from else None,
                       env=env)
    os.chdir(ROOT)
    orun.write_set(out, {"inputs.pt": inputs, "outputs.pt": outputs}, info, indent=2)
    (out / "README.md").write_text(README_NOTE.format(seed=weights_seed, data_seed=data_seed))
    orun.finish(out, work, timings["total"])


README_NOTE = """# M3DM parity set (weights seed {seed}, data seed {data_seed})

Made by `tools/parity/make_m3dm_set.py` (official M3DM at 62b7f46, unmodified, run-time patches only); the
format, the formulas and the tolerances are those of the shared set's README (`shared/parity/m3dm/README.md`).
Regenerate the weights with `python m3dm_weights.py --seed {seed} --out DIR`.
"""


if __name__ == "__main__":
    main()
