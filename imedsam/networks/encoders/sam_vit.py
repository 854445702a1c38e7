"""SAM's ViT image encoder with LoRA and the Frequency Adapter."""

from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT

from ..adapters.frequency import frequency_adapters, frequency_image
from ..adapters.lora import add_lora_to_attention
from ..adapters.volumetric import VolumetricAdapters

__all__ = ["AdaptedImageEncoder"]

# SAM's normalisation constants, for RGB in [0, 255].
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class AdaptedImageEncoder(nn.Module):
    """A frozen SAM ``ImageEncoderViT`` with LoRA on q/v and a Frequency Adapter in every block.

    Args:
        vit: SAM's image encoder, already holding its (possibly pretrained) weights. It is frozen here.
        lora_rank: rank of the q/v updates; 0 disables LoRA.
        lora_alpha: LoRA scaling numerator (defaults to the rank).
        fa_mode: ``"amplitude"``, ``"phase"`` or ``"none"``.
        fa_hidden_dim: bottleneck width of each frequency adapter.

    ``forward(image, slab_depth=D)``: as :class:`~imedsam.networks.encoders.AdaptedTinyViT`'s, ``B / D`` slabs of
    ``D`` consecutive slices for the :attr:`volumetric_adapters`, if set.

    Shapes: input ``[B, 3, S, S]`` RGB in [0, 1] with ``S = vit.img_size``; output the image embedding
    ``[B, 256, S / 16, S / 16]``.

    Example::

        >>> from imedsam.networks.presets import build_sam_parts
        >>> vit, _, _ = build_sam_parts("vit_tiny", 64)
        >>> AdaptedImageEncoder(vit)(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 256, 4, 4])
    """

    def __init__(
        self,
        vit: ImageEncoderViT,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        fa_mode: str = "amplitude",
        fa_hidden_dim: int = 4,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.vit.requires_grad_(False)
        self.image_size = vit.img_size
        self.fa_mode = fa_mode
        if lora_rank > 0:
            add_lora_to_attention(vit.blocks, rank=lora_rank, alpha=lora_alpha)
        widths = [vit.patch_embed.proj.out_channels] * len(vit.blocks)
        self.frequency_adapters = frequency_adapters(widths, fa_mode, fa_hidden_dim)
        self.block_widths = widths
        #: 3DSAM-adapter's slab adapters (:func:`~imedsam.networks.adapters.volumetric.add_volumetric_adapters`)
        self.volumetric_adapters: VolumetricAdapters | None = None
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1) / 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1) / 255.0, persistent=False)

    def _tokens(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.patch_embed(image)
        if self.vit.pos_embed is not None:
            tokens = tokens + self.vit.pos_embed
        return tokens

    def forward(self, image: torch.Tensor, slab_depth: int = 1) -> torch.Tensor:
        x = self._tokens((image - self.pixel_mean) / self.pixel_std)
        # the frequency map is already in [0, 1]; like the official code it skips SAM's normalisation
        freq = None if self.fa_mode == "none" else self._tokens(frequency_image(image, self.fa_mode))
        for index, block in enumerate(self.vit.blocks):
            x = block(x)
            if freq is not None:
                delta = self.frequency_adapters[index](freq)
                x, freq = x + delta, freq + delta
            if self.volumetric_adapters is not None:
                x = self.volumetric_adapters(index, x, slab_depth)
        return self.vit.neck(x.permute(0, 3, 1, 2))
