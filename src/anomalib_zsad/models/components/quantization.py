"""INT8 post-training quantisation settings for the exported CLIP models (``--compression_type int8_ptq``).

anomalib quantises every export with NNCF's generic preset. On a CLIP ViT that is both slower and
less accurate than it needs to be, for reasons measured on the exported OpenVINO graphs
(docs/deployment.md):

* NNCF quantises the inputs of OpenVINO's fused ``ScaledDotProductAttention``; the CPU plugin then
  splits it into separate int8 MatMul, Softmax and MatMul, which made the INT8 model of ViT-B/16
  1.8x *slower* than FP32 on an AVX2 CPU. Attention stays FP32 and fused.
* The head after the vision tower compares patch tokens with a handful of text embeddings, scales
  by 1/0.07 and takes a softmax, then blurs the map with a convolution. In 8 bits the map itself
  would be quantised (and ties lower pixel AUROC). Those comparisons (MatMuls with a constant
  operand of fewer than :data:`FEW_EMBEDDINGS` rows) and every convolution (the blur, and the patch
  embedding, well under 1 % of the work) stay FP32.
* What is quantised: the linear layers of the transformer blocks (and adapters), which are 70-80 %
  of the work, with NNCF's transformer preset (SmoothQuant, no quantisers on LayerNorm/Softmax).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openvino as ov

FEW_EMBEDDINGS = 16
KEEP_FP32_TYPES = ("ScaledDotProductAttention", "Convolution")


def embedding_comparisons(model: ov.Model) -> list[str]:
    """Names of the MatMuls that compare features with a few constant (text) embeddings."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in op.inputs():
            source = port.get_source_output().get_node()
            shape = port.get_partial_shape()
            constant = source.get_type_name() in {"Constant", "Convert"}
            if constant and shape.is_static and min(shape.to_shape()) < FEW_EMBEDDINGS:
                names.append(op.get_friendly_name())
                break
    return names


def quantization_arguments(model: ov.Model) -> dict[str, Any]:
    """Keyword arguments for ``nncf.quantize`` on an exported CLIP model (see the module docstring)."""
    import nncf

    return {
        "model_type": nncf.ModelType.TRANSFORMER,
        "ignored_scope": nncf.IgnoredScope(names=embedding_comparisons(model), types=list(KEEP_FP32_TYPES),
                                           validate=False),
    }


def quantize_ov_model(model: ov.Model, calibration_batches: Any) -> ov.Model:  # noqa: ANN401
    """NNCF post-training INT8 of ``model`` on an iterable of image batches (values in [0, 1])."""
    import nncf

    dataset = nncf.Dataset(calibration_batches, lambda batch: batch.image if hasattr(batch, "image") else batch)
    return nncf.quantize(model, dataset, **quantization_arguments(model))
