#!/usr/bin/env python
"""How much a trained model's volumetric adapters change what each encoder block passes on: per block, the norm of
the adapter's update over the norm of the block's output tokens, on slabs of the held-out BraTS patients.

    python scripts/volumetric_adapter_update.py CHECKPOINT [--slab-depth 5] [--volumetric-blocks all] [--slabs 4]

A ratio near 0 means the adapter left the 2D encoder as it was: the zero start has barely moved.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from imedsam.data import slab_datalist
from imedsam.networks import build_imedsam
from imedsam.transforms import LoadSlabd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--slab-depth", type=int, default=5)
    parser.add_argument("--volumetric-blocks", default="all", choices=("all", "last_half"))
    parser.add_argument("--slabs", type=int, default=4, help="slabs, spread over the test split")
    args = parser.parse_args()
    model = build_imedsam(volumetric_adapter=True, slab_depth=args.slab_depth, volumetric_blocks=args.volumetric_blocks)
    model.load_checkpoint(args.checkpoint).eval()
    model.encoder_precision = "float32"
    adapters = model.image_encoder.volumetric_adapters
    ratios: dict[str, list[float]] = {name: [] for name in adapters.adapters}

    def record(name):
        def hook(module, inputs, update):
            tokens = inputs[0]
            ratios[name].append(float(update.norm() / tokens.norm()))
        return hook

    for name, adapter in adapters.adapters.items():
        adapter.register_forward_hook(record(name))
    items = slab_datalist("test", slab_depth=args.slab_depth)
    for item in items[:: max(1, len(items) // args.slabs)][: args.slabs]:
        image = LoadSlabd()(item)["image"].as_tensor() / 255.0
        with torch.no_grad():
            model.encode(image.reshape(args.slab_depth, 3, *image.shape[-2:]), slab_depth=args.slab_depth)
    print("| block | width | update / tokens (mean over slabs) |")
    print("| --- | --- | --- |")
    widths = model.image_encoder.block_widths
    for name, values in ratios.items():
        print(f"| {name} | {widths[int(name)]} | {np.mean(values):.2e} |")


if __name__ == "__main__":
    main()
