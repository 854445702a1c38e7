"""I-MedSAM's presets (what :func:`~imedsam.networks.build.build_imedsam` builds for each name), SAM's encoder
shapes, and builders for the frozen SAM parts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

__all__ = [
    "ENCODER_PRESETS",
    "EncoderPreset",
    "IMEDSAM_PRESETS",
    "LITE_MEDSAM_IMAGE_SIZE",
    "OFFICIAL_SAM_CHECKPOINTS",
    "build_prompt_parts",
    "build_sam_parts",
    "get_preset",
]

#: SAM's patch size, prompt/decoder width and the resolution its checkpoints were trained at.
SAM_PATCH_SIZE = 16
SAM_PROMPT_DIM = 256
SAM_PRETRAIN_IMAGE_SIZE = 1024
#: LiteMedSAM's encoder input side; its TinyViT hard-codes the 64 x 64 token grid this gives.
LITE_MEDSAM_IMAGE_SIZE = 256


@dataclass(frozen=True)
class EncoderPreset:
    """Shape of one SAM ViT image encoder."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14


ENCODER_PRESETS: dict[str, EncoderPreset] = {
    "vit_b": EncoderPreset(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": EncoderPreset(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": EncoderPreset(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Not a SAM release: a small random-init encoder so tests and CPU demos run in seconds.
    "vit_tiny": EncoderPreset(embed_dim=192, depth=4, num_heads=3, global_attn_indexes=(1, 3)),
}

#: :func:`~imedsam.networks.build.build_imedsam`'s presets: the defaults each name gives before the caller's
#: overrides. ``lite_medsam`` is LiteMedSAM with its released weights, whose mask the decoder refines (the warm
#: start); the SAM presets take ``sam_checkpoint`` and are the paper's plain decoder, built at 256 unless the
#: caller passes ``image_size`` (the paper trains ``vit_b`` at 384).
IMEDSAM_PRESETS: dict[str, dict[str, object]] = {
    "lite_medsam": {"image_size": LITE_MEDSAM_IMAGE_SIZE, "mask_prior": True},
    **{name: {"image_size": 256, "mask_prior": False} for name in ENCODER_PRESETS},
}

#: The official SAM checkpoints: file name -> (preset, download URL, MD5 of the file).
OFFICIAL_SAM_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "sam_vit_b_01ec64.pth": (
        "vit_b",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "01ec64d29a2fca3f0661936605ae66f8",
    ),
    "sam_vit_l_0b3195.pth": (
        "vit_l",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "0b3195507c641ddb6910d2bb5adee89c",
    ),
    "sam_vit_h_4b8939.pth": (
        "vit_h",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "4b8939a88964f0f4ff5f5b2642c598a6",
    ),
}


def get_preset(encoder: str) -> EncoderPreset:
    if encoder not in ENCODER_PRESETS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODER_PRESETS)}")
    return ENCODER_PRESETS[encoder]


def build_sam_parts(encoder: str, image_size: int) -> tuple[ImageEncoderViT, PromptEncoder, MaskDecoder]:
    """Build SAM's image encoder, prompt encoder and mask decoder for square inputs of ``image_size``.

    The modules are SAM's own classes with SAM's shapes, so an official checkpoint loads into them
    once its position tables are resized (see :mod:`imedsam.networks.checkpoint`).
    """
    preset = get_preset(encoder)
    if image_size <= 0 or image_size % SAM_PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {SAM_PATCH_SIZE}, got {image_size}")
    grid = image_size // SAM_PATCH_SIZE
    image_encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=SAM_PATCH_SIZE,
        embed_dim=preset.embed_dim,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=4,
        out_chans=SAM_PROMPT_DIM,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=preset.window_size,
        global_attn_indexes=preset.global_attn_indexes,
    )
    return (image_encoder, *build_prompt_parts(image_size, grid))


def build_prompt_parts(image_size: int, grid: int) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder (the shapes SAM, MedSAM and LiteMedSAM share) for a square
    input of ``image_size`` whose image embedding is ``grid x grid``."""
    prompt_encoder = PromptEncoder(
        embed_dim=SAM_PROMPT_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=SAM_PROMPT_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=SAM_PROMPT_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder
