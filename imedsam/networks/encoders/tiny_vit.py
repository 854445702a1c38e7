"""LiteMedSAM's TinyViT image encoder with LoRA and the Frequency Adapter, and its letterbox preprocessing."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .folded_conv import fold_conv_bn_pairs
from ..adapters.frequency import frequency_adapters, frequency_image
from .fused_attention import use_fused_attention_in_training
from ..adapters.lora import add_lora_to_attention
from ..adapters.volumetric import VolumetricAdapters

__all__ = ["AdaptedTinyViT", "letterbox"]


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def letterbox(image: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """LiteMedSAM's preprocessing: the longest side to ``size`` with the aspect ratio kept, min-max to [0, 1]
    per image, zeros padded at the bottom and right.

    Args:
        image: ``[B, 3, h, w]`` in [0, 1].
        size: side of the square canvas.

    Returns:
        ``[B, 3, size, size]`` and the image's extent in the canvas, ``(new_h / size, new_w / size)``.
    """
    height, width = image.shape[-2:]
    longest = max(height, width)
    # LiteMedSAM rounds as int(s * 256 / longest + 0.5)
    new_h, new_w = (max(1, int(side * size / longest + 0.5)) for side in (height, width))
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    low = image.amin(dim=(1, 2, 3), keepdim=True)
    high = image.amax(dim=(1, 2, 3), keepdim=True)
    image = (image - low) / (high - low).clamp_min(1e-8)
    canvas = F.pad(image, (0, size - new_w, 0, size - new_h))
    return canvas, (new_h / size, new_w / size)


class AdaptedTinyViT(nn.Module):
    """LiteMedSAM's frozen TinyViT with LoRA on q and v and a Frequency Adapter on each of its attention blocks.

    TinyViT has a convolutional stage at 256 x 256 and three attention stages (2, 6 and 2 blocks at 128², 64²
    and 64², widths 128, 160 and 320). The frequency map goes through the frozen patch embedding and the first
    stage's down-sampler (not its MBConvs: that stage has no adapter) to reach the first attention stage's
    grid, and through each later stage's frozen down-sampler between stages, so every block's adapter sees
    a frequency token stream at its own resolution and width. As in :class:`AdaptedImageEncoder`, each
    adapter's output is added to the block output and to the stream.

    The fused ``qkv`` of TinyViT interleaves q, k and v per head; LoRA updates only the q and v rows. The
    frozen TinyViT's BatchNorms keep their pretrained statistics in training (see :meth:`train`).

    TinyViT's attention caches its bias table when switched to eval; a state dict loaded into this module
    refreshes that cache, so weights loaded after ``.eval()`` are used.

    Args:
        tiny_vit: LiteMedSAM's TinyViT holding its weights (see
            :func:`~imedsam.networks.encoders.lite_medsam.build_lite_medsam_parts`). It is frozen here.
        lora_rank, lora_alpha: the q/v updates; rank 0 disables LoRA.
        fa_mode: ``"amplitude"``, ``"phase"`` or ``"none"``.
        fa_hidden_dim: bottleneck width of each frequency adapter.
        fold_conv_bn: run each frozen convolution + BatchNorm pair as one convolution (exact; False runs them
            as TinyViT does, the reference the tests compare with).
        checkpoint_stages: the attention stages (0: 2 blocks at 128 x 128 tokens, 1: 6 blocks at 64 x 64,
            2: 2 blocks at 64 x 64) whose blocks and downsampler keep, in training, only their input for the
            backward pass and run their forward again there: the same gradients for less memory (their
            attention maps and MLP activations are not kept), for one more forward pass of those stages.
        fused_attention: in training, run the attention blocks through PyTorch's fused attention kernel,
            which keeps no attention map for the backward pass (:mod:`~imedsam.networks.encoders.fused_attention`;
            the same function, for less training memory: ``docs/speed.md``). Inference is unaffected.

    ``forward(image, frozen_stem_dtype=torch.bfloat16)`` runs the frozen stem (the patch embedding and the
    convolutional first stage, which have no adapter, and the frequency stream's copy of them) under
    ``torch.autocast`` in that dtype; the rest stays in float32. Training uses it where bfloat16 is native:
    no gradient flows through the stem, so it changes what the trainable layers see as inference does.
    ``forward(image, frequency=frequency_image(image, fa_mode))`` takes the frequency map from the caller: an
    exported graph (:class:`~imedsam.inference.OpenVINOEncoder`) then holds no FFT, which the engines lack.

    ``forward(image, slab_depth=D)`` with :attr:`volumetric_adapters` set: ``image`` is ``B / D`` slabs of ``D``
    consecutive slices each, and every adapter's 3D convolution mixes each slab's slices (3DSAM-adapter); without
    adapters the slices stay independent whatever ``D``.

    Shapes: input ``[B, 3, 256, 256]`` (a :func:`letterbox` canvas in [0, 1]); output ``[B, 256, 64, 64]``.

    Example::

        >>> from imedsam.networks.encoders.lite_medsam import build_lite_medsam_parts
        >>> encoder = AdaptedTinyViT(build_lite_medsam_parts()[0]).eval()
        >>> with torch.no_grad():
        ...     encoder(torch.rand(1, 3, 256, 256)).shape
        torch.Size([1, 256, 64, 64])
    """

    image_size = 256

    def __init__(
        self,
        tiny_vit: nn.Module,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        fa_mode: str = "amplitude",
        fa_hidden_dim: int = 4,
        fold_conv_bn: bool = True,
        checkpoint_stages: tuple[int, ...] = (),
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        self.vit = tiny_vit
        self.vit.requires_grad_(False)
        self.fold_conv_bn = fold_conv_bn
        if fold_conv_bn:
            # TinyViT's frozen convolutions and their BatchNorms run as single channels-last convolutions:
            # exact, and the encoder's largest cost on CPU (docs/speed.md); the state dict is unchanged
            fold_conv_bn_pairs(self.vit)
        self.fa_mode = fa_mode
        self.attention_stages = list(self.vit.layers[1:])
        if any(not 0 <= stage < len(self.attention_stages) for stage in checkpoint_stages):
            raise ValueError(f"checkpoint_stages name attention stages 0..{len(self.attention_stages) - 1}, got {checkpoint_stages}")
        self.checkpoint_stages = tuple(checkpoint_stages)
        if lora_rank > 0:
            for stage in self.attention_stages:
                add_lora_to_attention(stage.blocks, rank=lora_rank, alpha=lora_alpha, head_dim=stage.blocks[0].attn.key_dim)
        if fused_attention:
            for stage in self.attention_stages:
                for block in stage.blocks:
                    use_fused_attention_in_training(block.attn)
        widths = [stage.dim for stage in self.attention_stages for _ in stage.blocks]
        self.frequency_adapters = frequency_adapters(widths, fa_mode, fa_hidden_dim)
        self.block_widths = widths
        #: 3DSAM-adapter's slab adapters (:func:`~imedsam.networks.adapters.volumetric.add_volumetric_adapters`)
        self.volumetric_adapters: VolumetricAdapters | None = None
        self.register_load_state_dict_post_hook(self._refresh_attention_bias_cache)

    def train(self, mode: bool = True) -> AdaptedTinyViT:
        """Frozen BatchNorms stay in eval mode: TinyViT's convolutions carry BatchNorm, and a frozen
        backbone must neither normalise with the statistics of a fine-tuning batch nor overwrite its own."""
        super().train(mode)
        for module in self.vit.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    @staticmethod
    def _refresh_attention_bias_cache(module: AdaptedTinyViT, incompatible_keys) -> None:
        for sub in module.vit.modules():
            if hasattr(sub, "attention_bias_idxs"):
                sub.train(sub.training)  # in eval this rebuilds TinyViT's cached bias table from the new weights

    @property
    def stem_trains(self) -> bool:
        """Whether any weight of the stem (patch embedding, first stage) trains (``freeze_sam=False``)."""
        return any(p.requires_grad for part in (self.vit.patch_embed, self.vit.layers[0]) for p in part.parameters())

    @staticmethod
    def _checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(module, x, use_reentrant=False)

    def _stem(
        self, image: torch.Tensor, dtype: torch.dtype | None, frequency: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen stem's tokens and, with an adapter, the frequency stream's, in float32."""
        vit = self.vit
        # no dtype: whatever precision the caller runs in (an inference autocast reaches the stem too)
        with nullcontext() if dtype is None else torch.autocast(image.device.type, dtype=dtype):
            x = vit.layers[0](vit.patch_embed(image))
            freq = None
            if self.fa_mode != "none":
                if frequency is None:
                    frequency = frequency_image(image, self.fa_mode)
                freq = vit.layers[0].downsample(vit.patch_embed(frequency))
        if dtype is None:
            return x, freq
        return x.float(), None if freq is None else freq.float()

    def forward(
        self,
        image: torch.Tensor,
        frozen_stem_dtype: torch.dtype | None = None,
        frequency: torch.Tensor | None = None,
        slab_depth: int = 1,
    ) -> torch.Tensor:
        vit = self.vit
        if self.fold_conv_bn:  # the folded convolutions' weights are channels-last: so is their input
            image = image.contiguous(memory_format=torch.channels_last)
        x, freq = self._stem(image, frozen_stem_dtype, frequency)
        checkpointing = self.training and torch.is_grad_enabled()
        runners = [
            self._checkpointed if checkpointing and index in self.checkpoint_stages else _call
            for index in range(len(self.attention_stages))
        ]
        adapters = iter(self.frequency_adapters) if self.fa_mode != "none" else None
        block_index = 0
        for stage, run in zip(self.attention_stages, runners):
            for block in stage.blocks:
                x = run(block, x)
                if adapters is not None:
                    delta = next(adapters)(freq)
                    x, freq = x + delta, freq + delta
                if self.volumetric_adapters is not None:
                    x = self.volumetric_adapters(block_index, x, slab_depth)
                block_index += 1
            if stage.downsample is not None:
                x = run(stage.downsample, x)
                freq = None if freq is None else run(stage.downsample, freq)
        grid = self.image_size // 4
        return vit.neck(x.view(x.shape[0], grid, grid, -1).permute(0, 3, 1, 2))
