"""AnomalyCLIP with several attention heads: the official modules against ours, directly.

The parity sets use a 64-wide CLIP, so every attention there has one head and the head split is never
exercised. This builds the official ``AnomalyCLIP`` (``AnomalyCLIP_lib.build_model``, DPAM from
``DAPM_replace(20)``) and its prompt learner from ``--src`` (an export of the official repository, commit
45ed4dd; nothing of it is copied here) on a random CLIP ``--width`` wide (``width // 64`` heads in both
towers, as the official ``build_model`` derives them), and compares text features, the global feature and
the four DPAM patch-feature layers with this package's ``AnomalyCLIPModel`` on the same weights.

    python tools/parity/check_anomalyclip_heads.py --src /tmp/anomalyclip_off --width 128
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import official_run as orun
import torch
from narrow_clip import narrow_clip_state_dict, narrow_config

DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="export of the official repository (commit 45ed4dd)")
    parser.add_argument("--width", type=int, default=128, help="CLIP width of both towers (heads = width // 64)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    patches: list[str] = []
    orun.pkg_resources_stub(patches, "")
    orun.stub_module("thop", patches, "", profile=None)
    sys.path.insert(0, str(args.src.resolve()))
    import prompt_ensemble
    from AnomalyCLIP_lib.build_model import build_model

    from anomalib_zsad.clip import load_clip
    from anomalib_zsad.models.anomalyclip.checkpoint import load_official_checkpoint
    from anomalib_zsad.models.anomalyclip.torch_model import AnomalyCLIPModel

    state = narrow_clip_state_dict(args.seed, narrow_config(32, args.width, args.width))
    with contextlib.redirect_stdout(io.StringIO()):
        official = build_model("ViT-L/14@336px", {k: v.clone() for k, v in state.items()}, DESIGN).float()
        learner = prompt_ensemble.AnomalyCLIP_PromptLearner(official, DESIGN)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        for param in learner.parameters():
            param.normal_(std=0.02)
    official.visual.DAPM_replace(DPAM_layer=20)
    heads = (official.visual.transformer.resblocks[0].attn.num_heads, official.transformer.resblocks[0].attn.num_heads)
    images = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(args.seed + 2))
    with torch.no_grad():
        global_official, patches_official = official.encode_image(images, [6, 12, 18, 24], DPAM_layer=20)
        text_official = official.encode_text_learn(*learner(cls_id=None)).float()

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "clip.pt")
        torch.save({"prompt_learner": learner.state_dict()}, Path(tmp) / "prompt_learner.pt")
        clip = load_clip("ViT-L-14-336", Path(tmp) / "clip.pt", pos_embed_mode="bilinear")
        ours = AnomalyCLIPModel(clip)
        load_official_checkpoint(ours, Path(tmp) / "prompt_learner.pt")
    ours.eval()
    learnt = ours.prompt_learner
    with torch.no_grad():
        text = ours.clip.text(learnt.prompt_embeddings(ours.clip.text), learnt.token_ids.argmax(-1),
                              deep_prompts=learnt.deep_prompts(), round_deep_prompts_to_fp16=True)
        global_feature, patches_ours = ours.encode_image(images)
    diffs = {"text_features": (text - text_official).abs().max().item(),
             "global_feature": (global_feature - global_official).abs().max().item(),
             "patch_features": max((a - b).abs().max().item() for a, b in zip(patches_ours, patches_official,
                                                                              strict=True))}
    print(f"heads: official vision/text {heads}, ours {clip.arch.vision_heads}/{clip.arch.text_heads}")
    print("max abs diff: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    if heads != (clip.arch.vision_heads, clip.arch.text_heads) or max(diffs.values()) > args.tolerance:
        raise SystemExit("AnomalyCLIP differs from the official modules")


if __name__ == "__main__":
    main()
