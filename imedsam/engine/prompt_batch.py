"""``prepare_batch`` for prompted batches: MONAI's ``PrepareBatchExtraInput`` for the prompt keys a batch has."""

from __future__ import annotations

from collections.abc import Mapping

from monai.engines.utils import PrepareBatchExtraInput

__all__ = ["PreparePromptBatch"]


class PreparePromptBatch(PrepareBatchExtraInput):
    """:class:`monai.engines.PrepareBatchExtraInput` over a dictionary of keys (network argument: batch key),
    leaving out those the batch lacks.

    One ``prepare_batch`` then serves a trainer whose batches carry clicks beside their boxes
    (:class:`~imedsam.transforms.ClicksFromMaskd`) and the evaluator that shares it, whose batches carry boxes
    only, as the bundle's ``train.yaml`` has them. A key missing from every batch is the config's concern, so
    the boxes, without which nothing is prompted, are still required by :class:`~imedsam.engine.PromptInferer`.

    Example::

        >>> import torch
        >>> prepare = PreparePromptBatch({"boxes": "box", "points": "points"})
        >>> image, label, args, extra = prepare({"image": torch.zeros(1, 3, 4, 4), "label": torch.zeros(1, 1, 4, 4),
        ...                                      "box": torch.zeros(1, 1, 4)})
        >>> sorted(extra)
        ['boxes']
    """

    def __init__(self, extra_keys: Mapping[str, str]) -> None:
        if not isinstance(extra_keys, Mapping):
            raise TypeError(f"extra_keys must map network arguments to batch keys, got {type(extra_keys).__name__}")
        super().__init__(dict(extra_keys))

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        present = {argument: key for argument, key in self.extra_keys.items() if key in batchdata}
        return PrepareBatchExtraInput(present)(batchdata, device, non_blocking, **kwargs)
