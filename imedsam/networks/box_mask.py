"""I-MedSAM with the box drawn into a fourth input channel, for tools that pass one tensor."""

from __future__ import annotations

import torch

from .imedsam import IMedSAM

__all__ = ["IMedSAMBoxMask"]


class IMedSAMBoxMask(IMedSAM):
    """I-MedSAM with the box given as a fourth input channel, for tools that pass a single tensor.

    ``monai.bundle ckpt_export`` traces with one random input and MONAI Label's generic bundle task passes only
    the image; both get the box here as a filled rectangle in channel 3 (non-zero inside the box). The box is
    the bounding box of that channel's non-zero pixels, found with tensor ops so that it survives tracing.
    Built from the same parts as :class:`IMedSAM`, with the same state dict.

    Shapes: input ``[B, 4, h, w]`` (RGB in [0, 1] + box mask), output logits ``[B, 1, h, w]``.

    Example::

        >>> from imedsam.networks import build_imedsam
        >>> model = build_imedsam("vit_tiny", image_size=64, model_class=IMedSAMBoxMask).eval()
        >>> x = torch.rand(1, 4, 48, 48); x[:, 3] = 0; x[:, 3, 10:30, 5:40] = 1
        >>> model(x).shape
        torch.Size([1, 1, 48, 48])
    """

    @staticmethod
    def box_from_channel(mask: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` box mask -> ``[B, 1, 4]`` x0, y0, x1, y1 (pixel edges) of its non-zero pixels."""
        height, width = mask.shape[-2:]
        rows = (mask != 0).any(dim=-1).to(torch.int64)
        cols = (mask != 0).any(dim=-2).to(torch.int64)
        y0 = rows.argmax(dim=-1)
        x0 = cols.argmax(dim=-1)
        y1 = height - rows.flip(-1).argmax(dim=-1)
        x1 = width - cols.flip(-1).argmax(dim=-1)
        return torch.stack([x0, y0, x1, y1], dim=-1).unsqueeze(1).to(mask.dtype)

    def forward(self, image: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 4:
            raise ValueError(f"IMedSAMBoxMask takes [B, 4, H, W] (RGB + box mask), got {tuple(image.shape)}")
        if not torch.jit.is_tracing() and not (image[:, 3] != 0).flatten(1).any(dim=1).all():
            raise ValueError("the box channel (channel 3) is empty for at least one image: draw the box in it")
        boxes = self.box_from_channel(image[:, 3])
        return super().forward(image[:, :3].contiguous(), boxes, output_size)
