"""The volume datalist JSON (``bundle/datalists/shared_volumes.json``, ``modalities.json``): cases of image and
label volumes with the objects to segment in each."""

from __future__ import annotations

import json
import os

__all__ = ["read_volume_datalist"]


def read_volume_datalist(path: str, data_root: str | None = None) -> list[dict]:
    """Cases of a volume datalist JSON: ``{"cases": [{"case", "image", "label", "modality", "objects"}]}``.

    ``image`` and ``label`` are relative to ``data_root`` (default: the JSON's folder); ``objects`` maps a
    name to the label values that make the object (``{"whole tumour": [1, 2, 3, 4]}``), or is ``"each"`` for one
    object per label value; an optional ``set`` groups cases in the summary.
    """
    with open(path) as handle:
        table = json.load(handle)
    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(path))
    cases = []
    for entry in table.get("cases", []):
        missing = [key for key in ("image", "label") if key not in entry]
        if missing:
            raise ValueError(f"{path}: case {entry.get('case', '?')} has no {', '.join(missing)}")
        case = dict(entry)
        case["image"], case["label"] = (os.path.join(root, entry[key]) for key in ("image", "label"))
        cases.append(case)
    if not cases:
        raise ValueError(f"{path} lists no cases")
    return cases
