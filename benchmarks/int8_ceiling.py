"""How much faster INT8 can be on this CPU at all: OpenVINO FP32 vs INT8 on the MLP layers of a ViT-L.

    python benchmarks/int8_ceiling.py                 # 1370 tokens (518 px, patch 14), width 1024, 2 threads

The linear layers are 70-80 % of a CLIP ViT's work and the part that INT8 speeds up. This script
times a stack of ViT-L MLP layers (1024 -> 4096 -> 1024) alone, FP32 and NNCF-quantised INT8, in
OpenVINO on the CPU, and prints both throughputs and their ratio: the most any INT8 export of the
models can gain here. On CPUs with VNNI or AMX the ratio is 2-4x; with plain AVX2 the int8 dot
product needs three instructions per 32 products and the ratio stays close to 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1370)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    return parser.parse_args(argv)


def mlp_stack(tokens: int, width: int, layers: int):
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([1, tokens, width], np.float32, name="tokens")
    hidden = x
    for _ in range(layers):
        up = ops.constant((rng.standard_normal((4 * width, width)) / width**0.5).astype(np.float32))
        down = ops.constant((rng.standard_normal((width, 4 * width)) / (4 * width) ** 0.5).astype(np.float32))
        hidden = ops.matmul(ops.relu(ops.matmul(hidden, up, False, True)), down, False, True)
    return ov.Model([hidden], [x])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import nncf
    import numpy as np
    import openvino as ov

    rng = np.random.default_rng(1)
    inputs = [rng.random((1, args.tokens, args.width), dtype=np.float32) for _ in range(4)]
    models = {"fp32": mlp_stack(args.tokens, args.width, args.layers),
              "int8": nncf.quantize(mlp_stack(args.tokens, args.width, args.layers), nncf.Dataset(inputs),
                                    subset_size=len(inputs))}
    operations = args.layers * 2 * 2 * args.tokens * args.width * 4 * args.width
    rates = {}
    for name, model in models.items():
        request = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": args.threads}).create_infer_request()
        request.infer(inputs[0])
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            request.infer(inputs[0])
            times.append(time.perf_counter() - start)
        rates[name] = operations / statistics.median(times) / 1e9
        print(f"{name}: median {1000 * statistics.median(times):.0f} ms, {rates[name]:.0f} GOP/s")
    print(f"INT8 / FP32 throughput on this CPU: {rates['int8'] / rates['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
