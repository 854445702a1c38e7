"""Slabs of neighbouring slices for training a model with volumetric adapters (3DSAM-adapter): the all-modality
split's volume objects (:func:`~imedsam.data.modality_datalist`), cut into runs of consecutive slices."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .modalities import modality_datalist

__all__ = ["slab_datalist"]


def slab_datalist(
    split: str,
    split_file: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    slab_depth: int = 5,
    sets: Sequence[str] | None = ("brats2013_deepmedic_mr",),
    slab_step: int = 1,
    min_pixels: int = 50,
) -> list[dict]:
    """Slabs of ``slab_depth`` consecutive axial slices of one volume object each, every slice holding at least
    ``min_pixels`` of it (so that each slice has a box), starts ``slab_step`` slices apart.

    An item is :func:`~imedsam.data.modality_datalist`'s item of the slab's first slice with ``slab_depth`` added
    and ``name`` ending in the slab's range; :class:`~imedsam.transforms.LoadSlabd` reads it. Splits are the
    split file's (by patient for BraTS: never by slice). ``sets`` keeps only those sets of the split file
    (None: every volume set).

    Example::

        >>> items = slab_datalist("test", slab_depth=5)  # doctest: +SKIP
        >>> items[0]["name"], items[0]["slice"], items[0]["slab_depth"]  # doctest: +SKIP
        ('brats2013_deepmedic_mr/brats_2013_pat0004_1/whole tumour/k012-016', 12, 5)
    """
    for name, value in (("slab_depth", slab_depth), ("slab_step", slab_step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    slices = [item for item in modality_datalist(split, split_file, data_root, slice_step=1, min_pixels=min_pixels)
              if item["slice"] is not None and (sets is None or item["set"] in sets)]  # fmt: skip
    if sets is not None and not slices:
        raise ValueError(f"no volume object of the sets {list(sets)} in the {split!r} split")
    by_object: dict[tuple, dict[int, dict]] = {}
    for item in slices:
        by_object.setdefault((item["set"], item["case"], item["object"]), {})[item["slice"]] = item
    items = []
    for per_slice in by_object.values():
        for start in sorted(per_slice):
            run = range(start, start + slab_depth)
            if (start - min(per_slice)) % slab_step or not all(k in per_slice for k in run):
                continue
            first = per_slice[start]
            name = f"{first['name'].rsplit('/k', 1)[0]}/k{start:03d}-{start + slab_depth - 1:03d}"
            items.append({**first, "name": name, "slab_depth": slab_depth})
    return items
