"""What :meth:`~imedsam.inference.Predictor.predict` returns: the two maps and how they were made."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["Prediction"]


@dataclass(frozen=True, eq=False)
class Prediction:
    """One :meth:`~imedsam.inference.Predictor.predict` call's answer.

    Shapes: ``H x W`` maps for one box given as ``[x0, y0, x1, y1]``, ``N x H x W`` for ``N`` boxes or a
    :class:`~imedsam.networks.Prompts`; ``(H, W)`` the image's size or the call's ``output_size``.

    It unpacks as the two maps, ``probability, uncertainty = predictor.predict(box)``: that was ``predict``'s
    return value before this type, and the README, the command line and the MONAI Label app's users unpack it;
    the other fields are read by name. Iterating gives those two maps only (it is not a sequence: no indexing,
    no ``len``), and two predictions are equal only if they are the same object (``eq=False``: arrays).

    Example::

        >>> import numpy as np
        >>> prediction = Prediction(np.full((4, 6), 0.9, np.float32), np.zeros((4, 6), np.float32), (2, 3), False)
        >>> probability, uncertainty = prediction
        >>> probability.shape, prediction.decode_size, prediction.upsampled
        ((4, 6), (2, 3), True)
    """

    #: float32 in [0, 1]: the sigmoid of the logit at every output pixel
    probability: np.ndarray
    #: float32, same shape: the MC-dropout variance of the logit (0 where all dropout passes agree)
    uncertainty: np.ndarray
    #: ``(H, W)`` the implicit decoder was queried at; smaller than the maps when ``max_decode_side`` capped it
    #: and the logits were upsampled bilinearly
    decode_size: tuple[int, int]
    #: the image's encoding came from the predictor's cache: the encoder did not run for this image
    cache_hit: bool

    @property
    def upsampled(self) -> bool:
        """The maps were decoded at :attr:`decode_size` and upsampled to their own size."""
        return tuple(self.decode_size) != tuple(self.probability.shape[-2:])

    def __iter__(self) -> Iterator[np.ndarray]:
        """``probability`` then ``uncertainty``: unpack the two maps."""
        yield self.probability
        yield self.uncertainty
