#!/usr/bin/env python
"""Turn a bundle run's ``models/model.pt`` (a fine-tuned lite_medsam) into a weight set the package carries.

    python scripts/publish_weight_set.py --checkpoint runs/all/models/model.pt --name all_modalities \
        --modality-prompt --content-prompt
    python scripts/publish_weight_set.py --checkpoint runs/clicks/models/model.pt --name all_modalities_clicks \
        --decoder-lora-rank 4

Writes ``imedsam/weights/NAME.pt``: the tensors the training changed (:func:`imedsam.networks.weights.weight_set_state`),
checks that a fresh build loaded with them gives the checkpoint's model back, and prints the
``WEIGHT_SETS`` entry (file, SHA-256, options) to add to ``imedsam/networks/weights.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch


def main(argv=None) -> int:
    from imedsam.networks import build_imedsam
    from imedsam.networks.weights import WEIGHTS_DIR, load_weight_set, weight_set_state

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a bundle run's models/model.pt")
    parser.add_argument("--name", required=True, help="the weight set's name (a Python identifier)")
    parser.add_argument("--modality-prompt", action="store_true")
    parser.add_argument("--content-prompt", action="store_true")
    parser.add_argument("--decoder-lora-rank", type=int, default=0, help="the checkpoint's LoRA rank in SAM's two-way transformer")
    parser.add_argument(
        "--trained-on", metavar="NAMES",
        help="for a checkpoint saved before the modality prompt counted its training images: the modalities it was "
        "trained on, comma-separated (e.g. ct,mr,endoscopy,microscopy; 'any' is added), so that the others answer as 'any'",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.name.isidentifier():
        parser.error(f"--name must be an identifier, got {args.name!r}")
    options = {"modality_prompt": args.modality_prompt, "content_prompt": args.content_prompt}
    if args.decoder_lora_rank:
        options["decoder_lora_rank"] = args.decoder_lora_rank
    trained = build_imedsam(**options).load_checkpoint(args.checkpoint)
    if args.trained_on:
        from imedsam.data import normalize_modality
        from imedsam.networks.prompts import ANY_MODALITY

        prompt = trained.prompt_path.modality_prompt
        if prompt is None:
            parser.error("--trained-on is for a model with --modality-prompt")
        names = [normalize_modality(name) for name in args.trained_on.split(",")]
        with torch.no_grad():
            prompt.trained_images.zero_()
            prompt.trained_images[prompt.indices([*names, ANY_MODALITY])] = 1
    torch.manual_seed(0)
    state = weight_set_state(trained, build_imedsam(**options))
    os.makedirs(WEIGHTS_DIR, exist_ok=True)
    path = os.path.join(WEIGHTS_DIR, f"{args.name}.pt")
    torch.save(state, path)
    fresh = build_imedsam(**options)
    load_weight_set(fresh, path, path)
    expected = trained.state_dict()
    different = [key for key, value in fresh.state_dict().items() if not torch.equal(value, expected[key])]
    if different:
        raise SystemExit(f"the set does not give the checkpoint's model back: {len(different)} tensors differ, e.g. {different[:3]}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"wrote {path}: {len(state)} tensors, {sum(v.numel() for v in state.values())} values, {os.path.getsize(path)} bytes")
    print(f'    "{args.name}": WeightSet(file="{args.name}.pt", sha256="{digest}", options={options}),')
    return 0


if __name__ == "__main__":
    sys.exit(main())
