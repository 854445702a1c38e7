"""The ``imedsam`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np
from PIL import Image

from .cli_paths import check_output_path
from .data.modalities import MODALITIES, normalize_modality
from .data.pictures import read_picture

__all__ = ["main", "read_rgb_image"]

logger = logging.getLogger("imedsam")


#: mask outputs must be lossless; pictures (overlay, uncertainty) may be JPEG too
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
PICTURE_EXTENSIONS = MASK_EXTENSIONS + (".jpg", ".jpeg")


def read_rgb_image(path: str, max_pixels: int | None = None) -> np.ndarray:
    """Read a PNG/JPG/... file as ``H x W x 3`` uint8; a grey image is repeated to three channels. An image of
    more than ``max_pixels`` pixels (default :data:`imedsam.data.pictures.MAX_IMAGE_PIXELS`) is refused."""
    image = read_picture(path, max_pixels=max_pixels)
    if image.mode == "L":
        image = image.convert("RGB")
    elif image.mode != "RGB":
        raise ValueError(f"{path} is a {image.mode!r} image; I-MedSAM reads 8-bit RGB or grey (L) images")
    return np.asarray(image)


def _save_png(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array).save(path)


#: the weight set ``imedsam predict`` serves for lite_medsam when no checkpoint is given: it beats the untrained
#: start on every modality of ../shared/data (docs/results.md, "Every modality")
DEFAULT_WEIGHTS = "all_modalities"
#: the one it serves for --click: the same model trained on clicks too, which LiteMedSAM and DEFAULT_WEIGHTS
#: do not answer (docs/results.md, "Clicks through the prompt encoder")
CLICK_WEIGHTS = "all_modalities_clicks"


def _build_model(args: argparse.Namespace):
    import torch

    from .networks import build_imedsam

    if args.checkpoint is None and args.sam_checkpoint is None and args.encoder != "lite_medsam":
        logger.warning(
            "no --checkpoint given: the %s model is randomly initialised and its masks are meaningless; "
            "use the default --encoder lite_medsam, or train one (see README) and pass --checkpoint models/model.pt",
            args.encoder,
        )
    volumetric = {}
    if args.volumetric_adapter:
        volumetric = {"volumetric_adapter": True, "slab_depth": args.slab_depth, "volumetric_blocks": args.volumetric_blocks}
        if args.checkpoint is None:
            raise ValueError("--volumetric-adapter needs the --checkpoint that trained its adapters (train_volume.yaml)")
    if args.weights is None and not (args.checkpoint or args.encoder != "lite_medsam" or args.modality_prompt or args.content_prompt
                                     or args.decoder_lora_rank):  # fmt: skip
        args.weights = CLICK_WEIGHTS if args.click else DEFAULT_WEIGHTS
    if args.weights == "none":
        args.weights = None
    if args.weights is not None:
        if args.checkpoint or args.encoder != "lite_medsam":
            raise ValueError("--weights is a fine-tuned lite_medsam: give it without --checkpoint and --encoder")
        # the set states its own prompts and shapes
        model = build_imedsam(weights=args.weights, adaptive_points=args.adaptive_points)
        return model.to(torch.device(args.device))
    if args.image_size is None:
        args.image_size = 256 if args.encoder == "lite_medsam" else 384
    model = build_imedsam(
        args.encoder,
        image_size=args.image_size,
        sam_checkpoint=args.sam_checkpoint,
        fa_mode=args.fa_mode,
        lora_rank=args.lora_rank,
        num_classes=args.num_classes,
        adaptive_points=args.adaptive_points,
        modality_prompt=args.modality_prompt,
        content_prompt=args.content_prompt,
        decoder_lora_rank=args.decoder_lora_rank,
        **volumetric,
    )
    if args.checkpoint:
        model.load_checkpoint(args.checkpoint)
    return model.to(torch.device(args.device))


def _predict(args: argparse.Namespace) -> None:
    from .cli_volume import CLICKS_GAVE_NOTHING, is_volume_path, predict_volume
    from .data import box_from_mask, read_mask
    from .inference import Predictor
    from .visualize import heat_map, overlay

    if args.click_rounds is not None and args.click_rounds < 0:
        raise ValueError(f"--click-rounds must be 0 or more, got {args.click_rounds}")
    _check_clicks(args, is_volume_path(args.image))

    if is_volume_path(args.image):
        args.encoder_engine = args.encoder_engine or "auto"
        predict_volume(args, _build_model(args))
        return
    args.encoder_engine = args.encoder_engine or "torch"
    if args.box3d or args.slice is not None or args.window:
        raise ValueError("--box3d, --slice and --window are for volumes (.nii, .nii.gz, .nrrd or a DICOM folder)")
    check_output_path(args.output, "--output", MASK_EXTENSIONS)
    for option in ("uncertainty", "overlay"):
        if getattr(args, option):
            check_output_path(getattr(args, option), f"--{option}", PICTURE_EXTENSIONS)
    image = read_rgb_image(args.image, args.max_pixels)
    model = _build_model(args)
    if args.box_from_mask:
        reference = read_mask(args.box_from_mask)
        if reference.shape != image.shape[:2]:
            raise ValueError(f"mask {args.box_from_mask} is {reference.shape}, image {args.image} is {image.shape[:2]}")
        args.box = box_from_mask(reference).tolist()
        logger.info("box from %s: %s", args.box_from_mask, args.box)
    predictor = Predictor(
        model, max_decode_side=args.max_decode_side or None, decode_mode=args.decode_mode, encoder_engine=args.encoder_engine
    )
    predictor.set_image(image, modality=args.modality)
    prompts = args.box
    if args.click:
        prompts = _grown_click_prompt(predictor, _click_prompts(args.click, args.background_click), args.click_rounds or 0)
    if args.auto_box:
        box, confidence = predictor.propose_box()
        args.box = [round(float(v), 1) for v in box]
        logger.info("proposed box %s (confidence %.2f)", args.box, confidence)
        if confidence < 0.5:
            logger.warning("the proposal is unsure (peak foreground probability %.2f < 0.5): check the box, or draw one with --box", confidence)
        prompts = args.box
    prediction = predictor.predict(prompts, output_size=args.output_size, class_id=args.class_id)
    probability, uncertainty = _prompt_maps(prediction, prompts)
    if prediction.upsampled:
        logger.info("decoded at %dx%d (--max-decode-side %d), upsampled to %dx%d", prediction.decode_size[1],
                    prediction.decode_size[0], args.max_decode_side, probability.shape[1], probability.shape[0])  # fmt: skip
    mask = probability > args.threshold
    if args.click and not mask.any():
        logger.warning(CLICKS_GAVE_NOTHING)
    _save_png(mask.astype(np.uint8) * 255, args.output)
    logger.info("mask %dx%d, %d foreground pixels -> %s", mask.shape[1], mask.shape[0], int(mask.sum()), args.output)
    if args.uncertainty:
        _save_png(heat_map(uncertainty), args.uncertainty)
        logger.info("uncertainty (MC-dropout variance, max %.4g) -> %s", float(uncertainty.max()), args.uncertainty)
    if args.overlay:
        if mask.shape != image.shape[:2]:
            # The overlay is drawn on the image: query the decoder again at the image's own size.
            probability, uncertainty = _prompt_maps(predictor.predict(prompts, class_id=args.class_id), prompts)
        _save_png(overlay(image, probability > args.threshold, args.box, uncertainty=uncertainty), args.overlay)
        logger.info("overlay -> %s", args.overlay)


def _grown_click_prompt(predictor, prompts, rounds: int):
    """The clicks' prompt, or the box that grows their mask (:func:`~imedsam.inference.grow_click_mask`), at the
    image's own size, where the clicks are pixels."""
    from .inference import PropagationRule, grow_click_mask

    if rounds == 0:
        return prompts
    first = predictor.predict(prompts)
    points, labels = prompts.points[0, 0].numpy(), prompts.point_labels[0, 0].numpy()
    rule = PropagationRule(click_rounds=rounds)
    *_, box = grow_click_mask(lambda b: tuple(predictor.predict(b)), first.probability[0], first.uncertainty[0], points, labels, rule)
    if box is None:
        return prompts
    logger.info("the clicks' mask grown in the image with the box %s (--click-rounds %d)", [round(float(v), 1) for v in box], rounds)
    return box.tolist()


def _prompt_maps(prediction, prompts) -> tuple[np.ndarray, np.ndarray]:
    """The ``H x W`` probability and uncertainty of the one prompt: a box's maps as they are, a click
    :class:`~imedsam.networks.Prompts`' without its axis of one prompt."""
    from .networks import Prompts

    probability, uncertainty = prediction
    return (probability[0], uncertainty[0]) if isinstance(prompts, Prompts) else (probability, uncertainty)


def _check_clicks(args: argparse.Namespace, volume: bool) -> None:
    """``--click`` and ``--background-click``: X Y on a picture, I J K on a volume; background clicks with a click."""
    if args.background_click and not args.click:
        raise ValueError("--background-click goes with --click")
    for values in [*(args.click or []), *(args.background_click or [])]:
        if volume and len(values) != 3:
            raise ValueError(f"a click on a volume is I J K (three voxel indices), got {values}")
        if not volume and len(values) != 2:
            raise ValueError(f"a click on a picture is X Y (two numbers), got {values}; I J K is for volumes")


def _click_prompts(foreground: list[list[float]], background: list[list[float]] | None):
    """``--click X Y`` (and ``--background-click X Y``) as the one prompt of one picture."""
    from .networks import Prompts

    clicks = [*foreground, *(background or [])]
    labels = [1] * len(foreground) + [0] * len(background or [])
    return Prompts(points=[[clicks]], point_labels=[[labels]])


def _demo_data(args: argparse.Namespace) -> None:
    from .data import write_synthetic_dataset

    split = write_synthetic_dataset(args.directory, count=args.count, size=tuple(args.size), seed=args.seed)
    logger.info(
        "wrote %d synthetic image/mask pairs to %s (train %d, val %d, test %d)",
        args.count, args.directory, len(split["train"]), len(split["val"]), len(split["test"]),
    )


def _modality_argument(value: str) -> str | None:
    """``--modality``: the name of :data:`~imedsam.data.MODALITIES` for a name or DICOM code; anything else is
    an argparse error that lists the accepted names."""
    try:
        return normalize_modality(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imedsam", description="I-MedSAM: box-prompted segmentation at any resolution")
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="segment one image from one box, or objects of a volume in 3D")
    predict.add_argument(
        "--image", required=True,
        help="PNG/JPG image, or a volume: .nii, .nii.gz, .nrrd, or a folder holding one DICOM series",
    )  # fmt: skip
    prompt = predict.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
        help="box in image pixels (x1 = last column + 1); on a volume, drawn on --slice K, voxel indices i, j",
    )  # fmt: skip
    prompt.add_argument(
        "--box3d", nargs=6, type=float, action="append", metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
        help="a volume's object as its 3D box in voxel indices (i, j, k), upper bounds exclusive; repeat it for "
             "several objects: label n + 1 is the n-th box",
    )  # fmt: skip
    prompt.add_argument("--box-from-mask", metavar="MASK", help="take the tight box of this mask's foreground (> 127)")
    prompt.add_argument(
        "--click", nargs="+", type=float, action="append", metavar="X",
        help="a foreground click: X Y in image pixels, or I J K voxel indices on a volume (the propagation takes it "
             "from its slice); repeat it for more clicks. Through SAM's prompt encoder: needs a model trained with "
             "clicks (the all_modalities_clicks weight set, or a bundle run with click_prob > 0)",
    )  # fmt: skip
    prompt.add_argument(
        "--auto-box", action="store_true",
        help="no box: the model's box-proposal head proposes one from the image (needs a checkpoint trained with the head)",
    )  # fmt: skip
    predict.add_argument(
        "--background-click", nargs="+", type=float, action="append", metavar="X",
        help="with --click: a click on what is not the object (X Y, or I J K on a volume, where it stops the "
             "propagation before a slice whose mask covers it)",
    )  # fmt: skip
    predict.add_argument(
        "--click-rounds", type=int,
        help="with --click: times the clicks' mask may be grown by decoding again with its widened box (0: the clicks' "
             "own mask; default 0 on a picture, 3 on a volume, where the propagation needs the whole object's slice)",
    )  # fmt: skip
    predict.add_argument("--slice", type=int, help="volumes: the slice (k) that --box is drawn on")
    predict.add_argument(
        "--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
        help="volumes: intensities mapped to [0, 1] (default: CT L40/W400, -160..240 HU; MR the 0.5-99.5 percentiles)",
    )  # fmt: skip
    predict.add_argument(
        "--modality", type=_modality_argument, metavar="NAME",
        help=f"the image's modality: {', '.join(MODALITIES)}, or a DICOM Modality code (CT, MR, PT, US, CR, DX, MG, "
             "ES, OP, OPT, SM, ...), any case. A model with a modality prompt uses it; for a volume it also picks the "
             "default intensity rule: ct the CT window, any other the percentiles (default: not given; the rule is "
             "guessed from the values)",
    )  # fmt: skip
    predict.add_argument("--output", required=True, help="mask PNG (0/255); for a volume a label NIfTI (.nii.gz) on its grid")
    predict.add_argument("--uncertainty", help="uncertainty heat map PNG; for a volume a float NIfTI (.nii.gz)")
    predict.add_argument("--overlay", help="overlay PNG: image, prediction, box and uncertainty")
    predict.add_argument("--output-size", nargs=2, type=int, metavar=("H", "W"), help="mask size (default: the image's)")
    predict.add_argument("--checkpoint", help="trained I-MedSAM state dict (models/model.pt)")
    predict.add_argument(
        "--weights", metavar="NAME",
        help=f"a weight set this package carries: {DEFAULT_WEIGHTS} (the default for lite_medsam without --checkpoint: "
        f"fine-tuned on every shared modality, bundle/docs/README.md), {CLICK_WEIGHTS} (the default with --click: "
        "trained on clicks too), or none (LiteMedSAM's own weights, untrained)",
    )  # fmt: skip
    predict.add_argument("--sam-checkpoint", help="official SAM checkpoint for the frozen vit_* encoders")
    predict.add_argument(
        "--encoder", default="lite_medsam",
        help="lite_medsam (pretrained, the default), vit_b, vit_l, vit_h or vit_tiny (must match the checkpoint)",
    )  # fmt: skip
    predict.add_argument(
        "--image-size", type=int, help="encoder input size (must match the checkpoint; default 256 for lite_medsam, 384 else)"
    )
    predict.add_argument("--fa-mode", default="amplitude", choices=("amplitude", "phase", "none"))
    predict.add_argument("--lora-rank", type=int, default=4)
    predict.add_argument("--num-classes", type=int, default=1)
    predict.add_argument(
        "--modality-prompt", action="store_true",
        help="the model has MCP-MedSAM's modality token (bundle: modality_prompt true); must match the checkpoint",
    )  # fmt: skip
    predict.add_argument(
        "--content-prompt", action="store_true",
        help="the model has MCP-MedSAM's content token (bundle: content_prompt true); must match the checkpoint",
    )  # fmt: skip
    predict.add_argument(
        "--volumetric-adapter", action="store_true",
        help="the model has 3DSAM-adapter's volumetric adapters (bundle: volumetric_adapter true, train_volume.yaml); "
        "a volume's slices are then encoded in slabs of --slab-depth neighbours; must match the checkpoint",
    )  # fmt: skip
    predict.add_argument("--slab-depth", type=int, default=5, help="with --volumetric-adapter: the slab the model was trained with")
    predict.add_argument(
        "--decoder-lora-rank", type=int, default=0,
        help="LoRA rank in SAM's two-way transformer, as the checkpoint was trained (bundle: decoder_lora_rank; clicks need it)",
    )  # fmt: skip
    predict.add_argument("--volumetric-blocks", default="all", choices=("all", "last_half"), help="with --volumetric-adapter")
    predict.add_argument("--class-id", type=int, help="class of the box for multi-class models")
    predict.add_argument("--threshold", type=float, default=0.5)
    predict.add_argument("--device", default="cpu")
    predict.add_argument(
        "--max-pixels", type=int, default=None,
        help="refuse images with more pixels than this (default 50,000,000), before decoding them",
    )  # fmt: skip
    predict.add_argument(
        "--max-decode-side", type=int, default=1024,
        help="decode at most this many pixels on a side, then upsample the maps (0: decode every pixel); bounds time and memory",
    )  # fmt: skip
    predict.add_argument(
        "--decode-mode", choices=["adaptive", "exact"], default="adaptive",
        help="adaptive: a coarse grid, then full resolution near the boundary (fast); exact: every pixel (the method as published)",
    )  # fmt: skip
    predict.add_argument(
        "--adaptive-points", type=int, default=4096,
        help="points the adaptive mode evaluates at the output's level (half as many a level down); fewer answer "
             "faster on a slow CPU, for a measured loss of Dice (docs/speed.md)",
    )  # fmt: skip
    predict.add_argument(
        "--encoder-engine", choices=["torch", "openvino", "auto"], default=None,
        help="torch: eager PyTorch (the default for a picture: one image per call); openvino: the lite_medsam encoder compiled for "
             "this CPU, several times faster per image, after a conversion of seconds the first time a set of weights "
             "is seen (kept in $IMEDSAM_CACHE_DIR, default ~/.cache/imedsam); auto (the default for a volume, which "
             "encodes many slices): openvino where it applies",
    )  # fmt: skip
    predict.set_defaults(run=_predict)

    demo = commands.add_parser("demo-data", help="write synthetic polyp-like images and masks")
    demo.add_argument("directory")
    demo.add_argument("--count", type=int, default=24)
    demo.add_argument("--size", nargs=2, type=int, default=(256, 256), metavar=("H", "W"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, RuntimeError, TypeError) as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
