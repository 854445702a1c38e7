"""One value for every prompt the network may take: boxes, clicked points and the images' modality."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["PROMPT_KINDS", "Prompts", "as_prompts"]

#: the kinds of prompt a :class:`Prompts` can carry, in the order :attr:`Prompts.kinds` lists them
PROMPT_KINDS = ("boxes", "points", "modality")


def _as_tensor(value, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """``value`` as a tensor (floating kept, else ``dtype``), or None for None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() == dtype.is_floating_point else value.to(dtype)
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor, an array or a nested list of numbers, got {type(value).__name__}") from None


@dataclass(frozen=True)
class Prompts:
    """The prompts for a batch of images: ``N`` prompts per image, each a box and/or clicked points.

    One value travels from the user to the network (:meth:`~imedsam.networks.IMedSAM.decode`, ``forward``,
    :class:`~imedsam.engine.PromptInferer`, :meth:`~imedsam.inference.Predictor.predict`), so a new kind of
    prompt is a new field here rather than a new argument on every signature. A model states the kinds it
    uses (``IMedSAM.prompt_kinds``) and refuses, with :meth:`only`, a value that gives any other
    rather than ignore it. Shapes are checked here; values against the image's size by the model.

    Args:
        boxes: ``[B, N, 4]`` x0, y0, x1, y1 in pixels of the image: one box per prompt.
        points: ``[B, N, K, 2]`` x, y in pixels of the image: ``K`` clicks per prompt. Needs ``point_labels``.
        point_labels: ``[B, N, K]`` integer: 1 a foreground click, 0 a background one, -1 padding that lets
            prompts of fewer clicks share the tensor (SAM's convention).
        modality: the images' imaging modality, lower case as in the CVPR 2024 challenge (``"ct"``, ``"mr"``,
            ``"endoscopy"``, ...; :data:`~imedsam.networks.prompts.MODALITY_NAMES`): one name for the batch, or a
            sequence of ``B`` names (None in it: not known). A model with a modality prompt uses it (an image
            without one gets the "any" token); a model without one takes it and leaves it unused, as the
            intensity rules of a volume take it too.

    A tensor is kept as it is (integer boxes or points become float32, integer-valued labels int64); an array
    or a nested list becomes a tensor. Raises ``ValueError`` naming the field for a wrong shape, and when no
    box and no point is given.

    Example::

        >>> prompts = Prompts(boxes=[[[10.0, 20, 60, 70], [5, 5, 30, 30]]])
        >>> prompts.batch_size, prompts.num_prompts, prompts.kinds
        (1, 2, ('boxes',))
        >>> clicks = Prompts(points=[[[[30.0, 40], [8, 8]]]], point_labels=[[[1, 0]]])
        >>> clicks.points.shape, clicks.point_labels.dtype
        (torch.Size([1, 1, 2, 2]), torch.int64)
        >>> clicks.only(("boxes",), "IMedSAM")
        Traceback (most recent call last):
        ...
        ValueError: IMedSAM takes boxes only; these prompts give points, which it cannot use
    """

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    modality: str | Sequence[str | None] | None = None

    def __post_init__(self) -> None:
        boxes = _as_tensor(self.boxes, "boxes", torch.float32)
        points = _as_tensor(self.points, "points", torch.float32)
        labels = _as_tensor(self.point_labels, "point_labels", torch.int64)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "point_labels", labels)
        if boxes is None and points is None:
            raise ValueError("Prompts holds no box and no point: give boxes [B, N, 4] (or points with point_labels)")
        if boxes is not None and (boxes.dim() != 3 or boxes.shape[-1] != 4):
            raise ValueError(f"boxes must have shape [B, N, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
        if (points is None) != (labels is None):
            raise ValueError("points and point_labels go together: give both (1 foreground, 0 background) or neither")
        if points is not None:
            if points.dim() != 4 or points.shape[-1] != 2:
                raise ValueError(f"points must have shape [B, N, K, 2] (x, y), got {tuple(points.shape)}")
            if labels.shape != points.shape[:-1]:
                raise ValueError(f"point_labels must have shape {tuple(points.shape[:-1])} (one per point), got {tuple(labels.shape)}")
            if boxes is not None and boxes.shape[:2] != points.shape[:2]:
                raise ValueError(f"boxes {tuple(boxes.shape)} and points {tuple(points.shape)} must share [B, N]: one of each per prompt")
        modality = self.modality
        if modality is not None:
            names = [modality] if isinstance(modality, str) else list(modality) if isinstance(modality, (list, tuple)) else [0]
            if not all(name is None or (isinstance(name, str) and name) for name in names):
                raise ValueError(f"modality must be a non-empty string such as 'ct' or 'endoscopy' (or one per image), got {modality!r}")
            if not isinstance(modality, str):
                if len(names) != self.batch_size:
                    raise ValueError(f"modality gives {len(names)} names for {self.batch_size} images: give one, or one per image")
                object.__setattr__(self, "modality", tuple(names))

    def modalities(self) -> tuple[str | None, ...]:
        """The modality of each of the ``B`` images (None: not given)."""
        if self.modality is None or isinstance(self.modality, str):
            return (self.modality,) * self.batch_size
        return tuple(self.modality)

    @property
    def batch_size(self) -> int:
        """``B``: the number of images."""
        return (self.boxes if self.boxes is not None else self.points).shape[0]

    @property
    def num_prompts(self) -> int:
        """``N``: prompts per image."""
        return (self.boxes if self.boxes is not None else self.points).shape[1]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of prompt given (of :data:`PROMPT_KINDS`), e.g. ``("boxes",)``."""
        return tuple(kind for kind in PROMPT_KINDS if getattr(self, kind) is not None)

    def to(self, device: torch.device | str | None) -> Prompts:
        """The same prompts with every tensor on ``device`` (None: unchanged)."""
        if device is None:
            return self
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Prompts(**moved)

    def only(self, supported: Sequence[str], user: str = "this model") -> Prompts:
        """``self``, after checking that it gives no kind of prompt outside ``supported``; ``user`` names the
        model in the error. Raises ``ValueError`` naming the kinds it cannot use."""
        unusable = [kind for kind in self.kinds if kind not in supported]
        if unusable:
            raise ValueError(f"{user} takes {', '.join(supported)} only; these prompts give {', '.join(unusable)}, which it cannot use")
        return self


def as_prompts(prompts: Prompts | torch.Tensor | Sequence, device: torch.device | str | None = None) -> Prompts:
    """``prompts`` on ``device``: a :class:`Prompts` as it is, or boxes alone (a ``[B, N, 4]`` tensor, array or
    nested list, what the network took before :class:`Prompts`) as ``Prompts(boxes=prompts)``.

    Example::

        >>> as_prompts(torch.tensor([[[1.0, 2, 30, 40]]])).kinds
        ('boxes',)
    """
    if isinstance(prompts, Prompts):
        return prompts.to(device)
    if prompts is None:
        raise ValueError("no prompts: give boxes [B, N, 4] or a Prompts")
    return Prompts(boxes=prompts).to(device)
