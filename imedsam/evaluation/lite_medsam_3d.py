"""LiteMedSAM's 3D recipe from the CVPR 2024 "MedSAM on Laptop" challenge: the reference every volume result is
read against, run on the same volumes and prompts as this project's :class:`~imedsam.inference.VolumePredictor`.

The recipe, as its inference script runs it: the volume is mapped to 8 bits (CT window L40/W400, others the
0.5-99.5 percentiles of the non-zero voxels); the 3D box ``[x0, y0, z0, x1, y1, z1]`` prompts its middle slice
``(z0 + z1 - 1) // 2`` with its x/y extent; going out to ``z1 - 1`` and to ``z0``, each slice is prompted with the
box of its neighbour's mask at 256 scale, widened by 3 pixels on each side, or with the 3D box's x/y extent when
that mask is empty; the encoder runs again on every slice of every object; a later object overwrites an earlier
one. With ``open_ended`` (a 2D box and no z-range) the same walk goes on until a mask is empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..data.intensity import intensity_window
from ..inference.volume import VolumePrediction, check_volume
from ..inference.volume_prompts import ObjectPrompt
from ..networks.lite_medsam import LITE_MEDSAM_IMAGE_SIZE, LiteMedSAMReference

__all__ = ["LiteMedSAMVolumeRecipe"]

#: pixels added on each side of the neighbour mask's box at 256 scale (the recipe's ``bbox_shift``)
RECIPE_BOX_SHIFT = 3


class LiteMedSAMVolumeRecipe:
    """LiteMedSAM slice by slice, as the CVPR 2024 baseline propagates a 3D box (see the module docstring).

    Args:
        reference: a :class:`~imedsam.networks.LiteMedSAMReference` to share; a new one by default.
        cache_encodings: keep each slice's embedding for the next object or protocol. The recipe does not
            (False, what the benchmark times); the masks are the same either way, so evaluations cache.
    """

    def __init__(self, reference: LiteMedSAMReference | None = None, cache_encodings: bool = False) -> None:
        self.reference = reference or LiteMedSAMReference()
        self.cache_encodings = cache_encodings
        self._cache: dict[int, tuple] = {}
        self._volume: np.ndarray | None = None
        self.encoder_calls = 0

    def set_volume(self, volume, window: Sequence[float] | None = None, modality: str | None = None) -> None:
        array = check_volume(volume)
        low, high = intensity_window(array, window, modality)
        scaled = np.clip((array.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0
        self._volume = np.round(scaled).astype(np.uint8)
        self._cache = {}

    def _encoding(self, k: int):
        if k in self._cache:
            return self._cache[k]
        plane = np.ascontiguousarray(np.repeat(self._volume[:, :, k].T[..., None], 3, axis=-1))
        encoding = self.reference.encode(plane)
        self.encoder_calls += 1
        if self.cache_encodings:
            self._cache[k] = encoding
        return encoding

    def slice_mask(self, k: int, box, box_in_256: bool = False) -> np.ndarray:
        """LiteMedSAM's ``J x I`` mask of slice ``k`` for ``box`` (image pixels, or 256 scale)."""
        return self.reference.decode(self._encoding(k), box, box_in_256) > 0

    def _neighbour_box(self, mask: np.ndarray) -> list[int]:
        rows, columns = np.nonzero(mask)
        scale = LITE_MEDSAM_IMAGE_SIZE / max(mask.shape)
        limit = LITE_MEDSAM_IMAGE_SIZE - 1
        return [
            max(0, int(columns.min() * scale) - RECIPE_BOX_SHIFT), max(0, int(rows.min() * scale) - RECIPE_BOX_SHIFT),
            min(limit, int(columns.max() * scale) + RECIPE_BOX_SHIFT), min(limit, int(rows.max() * scale) + RECIPE_BOX_SHIFT),
        ]

    def _walk(self, prompt: ObjectPrompt, open_ended: bool, progress) -> dict[int, np.ndarray]:
        depth = self._volume.shape[2]
        low, high = (0, depth) if open_ended or prompt.z_range is None else prompt.z_range
        masks = {prompt.seed_slice: self.slice_mask(prompt.seed_slice, prompt.box)}
        for direction in (1, -1):
            k = prompt.seed_slice + direction
            while low <= k < high:
                neighbour = masks[k - direction]
                if neighbour.any():
                    masks[k] = self.slice_mask(k, self._neighbour_box(neighbour), box_in_256=True)
                elif open_ended:
                    break
                else:
                    masks[k] = self.slice_mask(k, prompt.box)
                if progress is not None:
                    progress(1)
                if open_ended and not masks[k].any():
                    del masks[k]
                    break
                k += direction
        return masks

    def predict(
        self, prompts: Sequence[ObjectPrompt], open_ended: bool = False, progress: Callable[[int], None] | None = None
    ) -> VolumePrediction:
        """Labels ``(I, J, K)``: object ``n`` is label ``n + 1``, later objects overwriting earlier ones. The
        probability and uncertainty of the result are not part of the recipe (zeros)."""
        if self._volume is None:
            raise RuntimeError("call set_volume() before predict()")
        if any(prompt.box is None for prompt in prompts):
            raise ValueError("LiteMedSAM's 3D recipe is prompted by boxes; a click prompt needs I-MedSAM's VolumePredictor")
        start, calls = time.perf_counter(), self.encoder_calls
        labels = np.zeros(self._volume.shape, np.uint16)
        ranges = []
        for index, prompt in enumerate(prompts):
            masks = self._walk(prompt, open_ended, progress)
            for k, mask in masks.items():
                labels[:, :, k][mask.T] = index + 1
            ranges.append((min(masks), max(masks) + 1))
        empty = np.zeros(0, np.float32)
        seconds = time.perf_counter() - start
        return VolumePrediction(labels, empty, empty, ranges, self.encoder_calls - calls, seconds, [p.seed_slice for p in prompts])


def main(argv: list[str] | None = None) -> int:
    """``python -m imedsam.evaluation.lite_medsam_3d --image VOLUME --box3d X0 Y0 Z0 X1 Y1 Z1 [...] --output L.nii.gz``:
    the recipe as one process, for the volume benchmark to time beside ``imedsam predict``."""
    import argparse
    import logging

    from ..cli_volume import load_volume, save_nifti
    from ..inference.volume_prompts import box3d_prompt

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--image", required=True)
    parser.add_argument("--box3d", nargs=6, type=float, action="append", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--window", nargs=2, type=float)
    parser.add_argument("--modality", choices=("ct", "mr"))
    args = parser.parse_args(argv)
    volume, affine = load_volume(args.image)
    recipe = LiteMedSAMVolumeRecipe()
    recipe.set_volume(volume, args.window, args.modality)
    result = recipe.predict([box3d_prompt(box, volume.shape) for box in args.box3d])
    save_nifti(result.labels.astype(np.uint8), affine, args.output)
    logging.getLogger(__name__).info("%d slices encoded in %.1f s -> %s", result.encoder_calls, result.seconds, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
