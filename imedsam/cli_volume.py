"""``imedsam predict`` on a volume: NIfTI, NRRD or a DICOM series folder in, a NIfTI label on its grid out."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np

from .cli_paths import check_output_path

__all__ = ["VOLUME_EXTENSIONS", "is_volume_path", "load_volume", "predict_volume", "save_nifti"]

logger = logging.getLogger("imedsam")

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr")
VOLUME_OUTPUT_EXTENSIONS = (".nii", ".nii.gz")


#: why a click prompt can give an empty mask, said where it does
CLICKS_GAVE_NOTHING = (
    "the clicks gave an empty mask: a model trained with boxes only (LiteMedSAM, the all_modalities weight set) "
    "does not answer clicks; use the all_modalities_clicks weight set (imedsam predict --click's default) or a checkpoint "
    "trained with click_prob > 0, or a box"
)


def is_volume_path(path: str) -> bool:
    """Whether ``path`` names a volume: a NIfTI or NRRD file, or a folder (a DICOM series)."""
    return os.path.isdir(path) or str(path).lower().endswith(VOLUME_EXTENSIONS)


def _check_output(path: str, option: str) -> None:
    if not str(path).lower().endswith(VOLUME_OUTPUT_EXTENSIONS):
        raise ValueError(f"{option} {path} must end in .nii.gz or .nii: a volume's result is a NIfTI on its grid")
    check_output_path(path, option, (os.path.splitext(path)[1].lower(),))


def load_volume(path: str):
    """``(array (I, J, K), affine)`` of a volume file or DICOM series folder, or a clear :class:`ImageReadError`."""
    from .inference.planes import ImageReadError, load_image_array
    from .inference.volume import check_volume

    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, name)) for name in os.listdir(path)):
            raise ImageReadError(f"{path} is an empty folder, not a DICOM series")
    image = load_image_array(path)
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[-1] != 1:
        raise ImageReadError(f"{path} is a 4D volume {array.shape}: give one 3D volume (split its time points or channels)")
    return check_volume(array), np.asarray(image.affine, dtype=np.float64)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write ``path`` whole or not at all: a temporary file in its folder, then a rename."""
    import nibabel

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = ".nii.gz" if path.lower().endswith(".gz") else ".nii"
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".imedsam-", suffix=suffix)
    os.close(handle)
    try:
        nibabel.save(nibabel.Nifti1Image(array, affine), temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _prompts(args: argparse.Namespace, shape):
    from .inference.volume_prompts import box3d_prompt, click_prompt, slice_box_prompt

    if args.click:  # each of three values and with a foreground click: checked by the command line
        if args.slice is not None:
            raise ValueError("--slice goes with --box; a click on a volume is I J K, its slice the third value")
        return [click_prompt(args.click, args.background_click, shape, mode="points")]
    if args.box3d:
        if args.slice is not None:
            raise ValueError("--slice goes with --box, not --box3d (a 3D box has its own z-range)")
        return [box3d_prompt(box, shape) for box in args.box3d]
    if args.box is None:
        raise ValueError("a volume takes --box3d X0 Y0 Z0 X1 Y1 Z1, --box X0 Y0 X1 Y1 with --slice K, or --click I J K")
    if args.slice is None:
        raise ValueError("--box on a volume needs --slice K, the slice the box is drawn on")
    return [slice_box_prompt(args.box, args.slice, shape)]


def predict_volume(args: argparse.Namespace, model) -> None:
    """Segment the objects of ``args.box3d`` (or ``args.box`` on ``args.slice``, or the object of ``args.click``)
    and write the label volume."""
    from tqdm import tqdm

    from .inference.volume import PropagationRule, VolumePredictor

    _check_output(args.output, "--output")
    if args.uncertainty:
        _check_output(args.uncertainty, "--uncertainty")
    if args.overlay or args.output_size or args.auto_box or args.box_from_mask:
        raise ValueError("--overlay, --output-size, --auto-box and --box-from-mask are for pictures, not volumes")
    volume, affine = load_volume(args.image)
    prompts = _prompts(args, volume.shape)
    session = VolumePredictor(
        model, rule=PropagationRule() if args.click_rounds is None else PropagationRule(click_rounds=args.click_rounds),
        max_decode_side=args.max_decode_side or None,
        decode_mode=args.decode_mode, encoder_engine=args.encoder_engine,
    )
    session.set_volume(volume, affine, window=args.window, modality=args.modality)
    logger.info("volume %s %s, modality %s, intensity window %s, %d object(s)", args.image, volume.shape,
                session.modality or "not given", session.window, len(prompts))  # fmt: skip
    known = sum(p.z_range[1] - p.z_range[0] for p in prompts) if all(p.z_range for p in prompts) else None
    with tqdm(total=known, unit="slice", desc="slices", disable=None) as bar:
        result = session.predict(prompts, progress=bar.update)
    for index, (first, last) in enumerate(result.slices, start=1):
        voxels = int((result.labels == index).sum())
        logger.info("label %d: slices %d..%d, %d voxels", index, first, last - 1, voxels)
        if voxels == 0 and prompts[index - 1].points is not None:
            logger.warning(CLICKS_GAVE_NOTHING)
    logger.info("%d slices encoded in %.1f s", result.encoder_calls, result.seconds)
    labels = result.labels.astype(np.uint8 if len(prompts) < 256 else np.uint16)
    save_nifti(labels, affine, args.output)
    logger.info("labels -> %s", args.output)
    if args.uncertainty:
        save_nifti(result.uncertainty, affine, args.uncertainty)
        logger.info("uncertainty (MC-dropout variance, max %.4g) -> %s", float(result.uncertainty.max()), args.uncertainty)
