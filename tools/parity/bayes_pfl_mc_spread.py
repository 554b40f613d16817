"""Bayes-PFL: does this project's Monte-Carlo inference fall inside the official run-to-run spread?

The official ``test.py`` draws its Monte-Carlo noise from the global RNG (fresh context draws per
image, the state draws of the first image reused), so its scores change with ``--seed``. The
parity tests inject the official draws; this tool checks the sampling itself: the official code
is run K times on one set (same weights and images, other ``--run-seed``) and this project's
model with its own noise (its default: common random numbers from ``reseed``):

* image score: ``--draws`` runs here, and as many with the official draw structure (fresh context
  draws per image, the first image's state draws for all) fed through the parity-checked path;
  means within ``--z`` standard errors, run-to-run sd ratio within [0.75, 1.33]; the K official
  ``test.py`` runs must be replayed exactly from their stored draws (1e-6) and their mean agree with
  the official-structure runs (their position in its tails is printed);
* maps (raw and smoothed, on the stored strided grid): ``--map-runs`` runs here against the K
  official runs, pixel by pixel: the 99th percentile of |difference of means| / standard error
  below ``--z``.

    for r in 1000 1001 1002 1003 1004; do
        python tools/parity/make_bayes_pfl_set.py --src /tmp/bpfl_off --seed 1 --run-seed $r --test-only \
            --out /tmp/spread/run$r
    done
    python tools/parity/bayes_pfl_mc_spread.py /tmp/spread/run*/bayes_pfl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import official_run as orun
import torch

MEAN, STD = torch.tensor(orun.CLIP_MEAN), torch.tensor(orun.CLIP_STD)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class Ours:
    """This project's model on the set's weights and test images."""

    def __init__(self, folder: Path, num_samples: int) -> None:
        from anomalib_zsad.clip import load_clip
        from anomalib_zsad.models.bayes_pfl import BayesPFLModel, load_official_checkpoint

        clip = load_clip("bayes-pfl-parity", folder / "clip_state_dict.pt", activation="gelu")
        self.model = load_official_checkpoint(BayesPFLModel(clip, num_samples=num_samples),
                                              folder / "checkpoint.pth").eval()
        inputs, outputs = load(folder / "inputs.pt"), load(folder / "outputs.pt")
        self.images = inputs["test_images_resized_uint8"].float().div(255).sub(MEAN[:, None, None]).div(
            STD[:, None, None])
        self.names = [name for name, _ in inputs["test_set"]]
        self.idx = outputs["upsampled_sub_index"]
        self.samples = num_samples
        with torch.no_grad():
            self.features, self.tokens = self.model.encode_image(self.images)
            self.g = self.model.global_embedding(self.features, self.tokens, 2)
            self.ids = self.model.token_ids(self.names, len(self.names))

    def image_prob(self, noise) -> torch.Tensor:
        """test.py's image score (mean abnormal softmax over samples and prompts) for given noise."""
        model = self.model
        with torch.no_grad():
            z = model.sample_context(self.features, noise.context_for(len(self.names))).zk.transpose(0, 1)
            normal, abnormal = model.sample_states(noise.normal, noise.abnormal)
            text = model.text_embeddings(self.ids, z, normal.zk[:, 0], abnormal.zk[:, 0])
            logits = model.image_logits(text, self.g)
        half = logits.shape[1] // 2
        return torch.sigmoid(logits[:, half:] - logits[:, :half]).mean(1)

    def own_noise(self, seed: int):
        self.model.reseed(seed)
        return self.model.inference_noise()

    def official_noise(self, generator: torch.Generator):
        """The official draw structure: fresh context draws per image, the first image's state draws."""
        from anomalib_zsad.models.bayes_pfl import PromptNoise

        n, dim = len(self.names), self.features.shape[-1]
        context = torch.randn(n, self.samples, dim, generator=generator)
        states = torch.randn(2, self.samples, dim, generator=generator)
        return PromptNoise(context, states[0], states[1])

    def maps(self, seed: int) -> dict[str, torch.Tensor]:
        self.model.reseed(seed)
        with torch.no_grad():
            out = self.model.predict_from_features(self.features, self.tokens, tuple(self.images.shape[-2:]),
                                                   self.names)
        idx = self.idx
        return {"anomaly_map_sub": out["raw_map"][:, idx][:, :, idx],
                "anomaly_map_smoothed_sub": out["anomaly_map"][:, idx][:, :, idx]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", type=Path, nargs="+", help="official test-only runs of one set (bayes_pfl folders)")
    parser.add_argument("--draws", type=int, default=100,
                        help="runs of the image score here and of the official draw structure (see the docstring)")
    parser.add_argument("--map-runs", type=int, default=5, help="runs of the full maps here (seeds 0..)")
    parser.add_argument("--z", type=float, default=4.0, help="bound on |difference of means| / standard error")
    args = parser.parse_args()
    torch.set_num_threads(2)
    first = args.sets[0]
    for other in args.sets[1:]:
        for name in ("clip_state_dict.pt", "checkpoint.pth"):
            a, b = load(first / name), load(other / name)
            a, b = a.get("MyModel", a), b.get("MyModel", b)
            if any(not torch.equal(a[k], b[k]) for k in a):
                raise SystemExit(f"{other} has other weights than {first} ({name})")
    runs = [load(s / "outputs.pt") for s in args.sets]
    official = {key: torch.stack([r[key] for r in runs]).double()
                for key in ("image_scores", "anomaly_map_sub", "anomaly_map_smoothed_sub")}
    ours = Ours(first, runs[0]["mc_eps"].shape[2])
    failed = False

    def z_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt().clamp_min(1e-12)
        return (a.mean(0) - b.mean(0)).abs() / se

    # 1. image score: this project's sampling against the official draw structure, many runs each
    generator = torch.Generator().manual_seed(12345)
    own = torch.stack([ours.image_prob(ours.own_noise(seed)) for seed in range(args.draws)]).double()
    reference = torch.stack([ours.image_prob(ours.official_noise(generator)) for _ in range(args.draws)]).double()
    direct = official["image_scores"]
    # each official run is this model fed with that run's stored draws (the parity path)
    from anomalib_zsad.models.bayes_pfl import PromptNoise

    replay = max((ours.image_prob(PromptNoise(r["mc_eps"][:, 0, :, 0], r["mc_eps"][0, 1, :, 0], r["mc_eps"][0, 2, :, 0]))
                  .double() - r["image_scores"].double()).abs().max().item() for r in runs)
    failed |= replay > 1e-6
    print(f"official runs replayed from their stored draws: max |diff| {replay:.2g}")
    print(f"image score, {args.draws} runs (R = {ours.samples}) here and with the official draw structure, "
          f"{direct.shape[0]} official test.py runs")
    for image in range(direct.shape[1]):
        ratio = own[:, image].std() / reference[:, image].std()
        z_ref = z_of(own[:, image:image + 1], reference[:, image:image + 1]).item()
        z_direct = z_of(direct[:, image:image + 1], reference[:, image:image + 1]).item()
        above = (reference[:, image] >= direct[:, image].max()).double().mean().item()
        below = (reference[:, image] <= direct[:, image].min()).double().mean().item()
        bad = z_ref > args.z or not 0.75 < ratio < 1.33 or z_direct > args.z
        failed |= bad
        print(f"  image {image}: here mean {own[:, image].mean():.4f} sd {own[:, image].std():.4f} | official "
              f"structure mean {reference[:, image].mean():.4f} sd {reference[:, image].std():.4f} | official "
              f"runs {', '.join(f'{v:.4f}' for v in direct[:, image].tolist())} | z(here) {z_ref:.2f}, sd ratio "
              f"{ratio:.2f}, z(official runs) {z_direct:.2f}; official-structure runs above the highest / below "
              f"the lowest official run: {above:.1%} / {below:.1%} -> {'FAIL' if bad else 'ok'}")
    # 2. maps: this project's draws against the official test.py runs (means, pixel by pixel)
    mine = [ours.maps(seed) for seed in range(args.map_runs)]
    for key in ("anomaly_map_sub", "anomaly_map_smoothed_sub"):
        a, b = official[key], torch.stack([m[key] for m in mine]).double()
        z = z_of(a, b).flatten()
        ratio = (b.std(0) / a.std(0).clamp_min(1e-12)).flatten().median().item()
        bad = z.quantile(0.99).item() > args.z
        failed |= bad
        print(f"{key}: {a.shape[0]} official runs, {b.shape[0]} here; pixel |z| of the means: median "
              f"{z.median():.2f}, 99 % {z.quantile(0.99):.2f}, max {z.max():.2f}; median sd ratio here/official "
              f"{ratio:.2f} -> {'FAIL' if bad else 'ok'}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
