"""How far AdaCLIP's image score moves with the k-means of its hybrid semantic fusion (HSF).

The official HSF clusters the 100 most anomalous patches with ``sklearn.cluster.KMeans(20,
n_init="auto")`` and no ``random_state``: the labels, hence the image score, depend on numpy's global
RNG state at the call. For each image of each parity set this script

* runs the **official** ``HybridSemanticFusion`` (imported from ``--src``, an export of the official
  repository) on the set's stored HSF input under ``--states`` numpy states (``np.random.seed(r)``),
  and turns each result into the official image score ``softmax(100 (0.2 h + 0.8 c) @ text)[1]``;
* does the same with this project's HSF (default torch k-means, and the sklearn backend), and
* reports the official run-to-run range and where ours falls.

The anomaly maps do not depend on the HSF (only the image score does), so they do not move.

    python tools/parity/adaclip_kmeans_spread.py --src /tmp/adaclip_off /tmp/parity_seeds/seed{1..12}
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def official_hsf(src: Path):
    sys.path.insert(0, str(Path(__file__).parent))
    from make_adaclip_set import install_stubs

    install_stubs({})
    # The package without its __init__ (which builds the trainer and reads the BPE vocabulary).
    package = types.ModuleType("method")
    package.__path__ = [str(src / "method")]
    sys.modules["method"] = package
    from method.adaclip import HybridSemanticFusion

    return HybridSemanticFusion(20)


def score(h: torch.Tensor, cls: torch.Tensor, text: torch.Tensor) -> float:
    """Official: ``f = normalize(0.2 h + 0.8 c)``, ``softmax(100 f @ text)[1]``; text [E, 2]."""
    fused = F.normalize(0.2 * h + 0.8 * cls, dim=-1)
    return torch.softmax(100.0 * fused[None] @ text, dim=-1)[0, 1].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", type=Path, help="set roots (each holding adaclip/)")
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--states", type=int, default=50, help="numpy states per image (official runs)")
    args = parser.parse_args()
    from anomalib_zsad.models.adaclip.hsf import HybridSemanticFusion

    official = official_hsf(args.src)
    ours = {"torch": HybridSemanticFusion(20), "sklearn seed 0": HybridSemanticFusion(20, kmeans_backend="sklearn")}
    rows = []
    print("| set | image | golden | official min | median | max | range | torch | torch - median | sklearn(0) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for root in args.sets:
        out = torch.load(root / "adaclip" / "outputs.pt", map_location="cpu", weights_only=False)
        for b in range(out["hsf_kmeans_input"].shape[0]):
            x = out["hsf_kmeans_input"][b]  # [n, L*E], the layers side by side
            layers = list(x.reshape(x.shape[0], 4, -1).unbind(1))  # L x [n, E]
            tokens = [t[None] for t in layers]
            # Descending fake logits: the official top-k then keeps all n tokens in their order.
            ranking = torch.linspace(1, -1, x.shape[0])  # distinct probabilities, no ties
            logits = [torch.stack([-ranking, ranking], -1)[None]] * 4
            cls, text = out["cls_token_projected"][b], out["text_features"][b]
            with torch.no_grad():
                check = official.forward(tokens, logits)  # consumes numpy RNG; only a sanity check of shapes
            assert check.shape == (1, x.shape[1] // 4)
            scores = []
            for r in range(args.states):
                np.random.seed(r)  # noqa: NPY002 (the official call draws from the global state)
                with torch.no_grad():
                    scores.append(score(official.forward(tokens, logits)[0], cls, text))
            scores = np.array(scores)
            mine = {}
            with torch.no_grad():  # the stored official labels reproduce the stored official score
                h, _ = ours["torch"].cluster_feature(tokens, out["hsf_kmeans_labels"][b][None])
            assert abs(score(h[0], cls, text) - out["anomaly_score"][b].item()) < 1e-5, "HSF formula check"
            for name, hsf in ours.items():
                with torch.no_grad():
                    h, _ = hsf.cluster_feature(tokens)
                mine[name] = score(h[0], cls, text)
            med = float(np.median(scores))
            golden = out["anomaly_score"][b].item()
            rows.append((scores.min(), med, scores.max(), mine["torch"], golden))
            print(f"| {root.name} | {b} | {golden:.4f} | {scores.min():.4f} | {med:.4f} | {scores.max():.4f} | "
                  f"{scores.max() - scores.min():.4f} | {mine['torch']:.4f} | {mine['torch'] - med:+.4f} | "
                  f"{mine['sklearn seed 0']:.4f} |")
    arr = np.array(rows)
    inside = ((arr[:, 3] >= arr[:, 0]) & (arr[:, 3] <= arr[:, 2])).sum()
    print(f"\nofficial range (max - min over {args.states} numpy states): median "
          f"{np.median(arr[:, 2] - arr[:, 0]):.4f}, max {np.max(arr[:, 2] - arr[:, 0]):.4f}")
    print(f"torch k-means inside the official range: {inside} of {len(arr)}; |torch - official median|: "
          f"median {np.median(np.abs(arr[:, 3] - arr[:, 1])):.4f}, max {np.max(np.abs(arr[:, 3] - arr[:, 1])):.4f}")
    print(f"golden (the stored official run) inside the range: "
          f"{((arr[:, 4] >= arr[:, 0]) & (arr[:, 4] <= arr[:, 2])).sum()} of {len(arr)}")


if __name__ == "__main__":
    main()
