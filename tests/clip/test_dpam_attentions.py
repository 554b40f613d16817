"""DPAM's attention variants (AnomalyCLIP Fig. 6 / Table 10) against the formulas written out by hand."""

from __future__ import annotations

import pytest
import torch

from anomalib_zsad.clip import DPAM_ATTENTIONS, ClipModel
from anomalib_zsad.clip.layers import Attention


def by_hand(attn: Attention, x: torch.Tensor, kind: str) -> torch.Tensor:
    """softmax(a a^T / sqrt(d)) v per head, with the matrix written out, then the output projection."""
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    a = {"qq": q, "kk": k, "vv": v}[kind]
    weights = (a @ a.transpose(-1, -2) / a.shape[-1] ** 0.5).softmax(-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("kind", ["vv", "qq", "kk"])
def test_dpam_attention_equals_the_formula(tiny_clip: ClipModel, kind: str) -> None:
    """Q-Q attention is softmax(q q^T / sqrt(d)) v of the same block, K-K and V-V alike; fused (SDPA)."""
    block = tiny_clip.visual.blocks[1]
    x = block.ln_1(torch.randn(2, 17, block.attn.out_proj.in_features, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        expected = by_hand(block.attn, x, kind)
        torch.testing.assert_close(block.attn.forward_vv(x, kind), expected, atol=1e-5, rtol=1e-5)
        ori, dpam = block.attn.forward_dual(x, kind=kind)
        torch.testing.assert_close(dpam, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ori, block.attn(x), atol=1e-6, rtol=1e-6)
        ori_first, dpam_first = block.attn.forward_dual(x, first_queries=1, kind=kind)
        torch.testing.assert_close(dpam_first, expected, atol=1e-5, rtol=1e-5)  # all rows of the DPAM path
        torch.testing.assert_close(ori_first, ori[:, :1], atol=1e-6, rtol=1e-6)


def test_the_variants_differ_and_unknown_is_refused(tiny_clip: ClipModel) -> None:
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = {kind: tiny_clip.visual(images, [4], vv_from=2, dpam_attention=kind).layers[4]
               for kind in DPAM_ATTENTIONS}
        plain = tiny_clip.visual(images, [4]).layers[4]
    for a in ("vv", "qq", "kk"):
        for b in ("vv", "qq", "kk", "none"):
            if a != b:
                assert not torch.allclose(out[a], out[b], atol=1e-4)
    with pytest.raises(ValueError, match="dpam_attention"):
        tiny_clip.visual(images, [4], vv_from=2, dpam_attention="qk")
    torch.testing.assert_close(out["none"], plain, atol=0, rtol=0)


def test_dpam_tower_with_qq_equals_the_dual_loop_by_hand(tiny_clip: ClipModel) -> None:
    """The whole DPAM stream with Q-Q attention: x_qq += qq_attn(ln_1 x) from block 2 on."""
    visual = tiny_clip.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = visual.embed(images)
        x_dpam = None
        for number, block in enumerate(visual.blocks, start=1):
            h = block.ln_1(x)
            if number >= 2:
                x_dpam = (x if x_dpam is None else x_dpam) + by_hand(block.attn, h, "qq")
            x = x + block.attn(h)
            x = x + block.mlp(block.ln_2(x))
        tokens = visual(images, [4], vv_from=2, dpam_attention="qq")
    torch.testing.assert_close(tokens.layers[4], x_dpam, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.cls, x[:, 0], atol=1e-5, rtol=1e-5)
