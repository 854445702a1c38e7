"""I-MedSAM: SAM with LoRA, a Frequency Adapter and an implicit segmentation decoder."""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters.volumetric import check_slab_depth
from .box_proposal import BoxProposal, BoxProposalHead, boxes_from_foreground
from .checkpoint import keep_missing_optional_parts, load_state_dict_checked, read_state_dict
from .encoders.tiny_vit import AdaptedTinyViT, letterbox
from .implicit.decoder import ImplicitSegmentationDecoder
from .implicit.layers import rename_legacy_keys
from .outputs import IMedSAMOutput, ImageEncoding
from .precision import resolve_precision
from .prompts.box_path import BoxPromptPath
from .prompts.prompts import Prompts, as_prompts
from .validation import check_boxes, check_image, check_output_size, check_parts, check_points, check_query_lines

__all__ = ["DECODE_MODES", "IMedSAM", "IMedSAMOutput", "ImageEncoding"]

logger = logging.getLogger(__name__)


DECODE_MODES = ("exact", "adaptive")


class IMedSAM(nn.Module):
    """I-MedSAM (Wei et al., ECCV 2024): box- (or click-) prompted segmentation at any output resolution, from its parts.

    The image encoder encodes an image once; each box goes through the prompt path; the implicit decoder, with
    uncertainty-guided sampling, predicts a logit at every pixel of the requested output grid. Build one from a
    preset with :func:`~imedsam.networks.build.build_imedsam`; this constructor takes parts already made, as
    segment-anything's ``Sam`` does.

    Args:
        image_encoder: ``[B, 3, S, S]`` RGB in [0, 1] -> the image embedding ``[B, C, g, g]``, with ``S`` its
            ``image_size``: an :class:`~imedsam.networks.encoders.AdaptedImageEncoder` (SAM's ViT: any image is
            resized to ``S x S``) or an :class:`~imedsam.networks.encoders.AdaptedTinyViT` (LiteMedSAM's: any
            image is letterboxed by :func:`~imedsam.networks.encoders.letterbox`, and the padding never decoded).
        prompt_path: a :class:`~imedsam.networks.prompts.BoxPromptPath` over SAM's prompt encoder and mask
            decoder, whose ``transformer_dim`` is ``C``: embedding and boxes in pixels of the ``S x S`` input ->
            the box-conditioned map ``[P, 32, 4g, 4g]`` (and, with ``sam_mask=True``, SAM's mask-head weights).
        decoder: an :class:`~imedsam.networks.implicit.ImplicitSegmentationDecoder` reading those maps
            (``box_channels`` the path's ``out_channels``, ``image_channels`` = ``C``); its ``num_classes`` heads
            are the model's. None: SAM's own mask, bilinearly upsampled (the ``use_inr=False`` ablation), which
            needs a path built with ``sam_mask=True``, as does a decoder with ``mask_prior``.
        box_proposal: a :class:`~imedsam.networks.box_proposal.BoxProposalHead` on the embedding, trained beside
            the decoder with gradients stopped; :meth:`propose_boxes` then proposes a box for an image nobody has
            prompted. None: no head.

    Settings, attributes that may change at any time: :attr:`decode_mode` and :attr:`encoder_precision` (below).

    Shapes: ``image [B, 3, h, w]`` RGB in [0, 1]; ``prompts`` a :class:`~imedsam.networks.prompts.Prompts` of
    ``boxes [B, N, 4]`` x0, y0, x1, y1 in pixels of ``image``, clicks ``points [B, N, K, 2]`` (x, y pixel
    indices) with ``point_labels [B, N, K]`` (beside the boxes or alone), and a ``modality`` (used by a prompt
    path with a modality prompt); or that box tensor alone. Output logits ``[B, N, H, W]`` with
    ``(H, W) = output_size`` (default ``(h, w)``). A click answers only once the model is trained with clicks
    (the bundle's ``click_prob``): LiteMedSAM was trained with boxes, and gives an empty mask for one.

    Example::

        >>> from imedsam.networks import AdaptedImageEncoder, BoxPromptPath, ImplicitSegmentationDecoder, Prompts
        >>> from imedsam.networks.presets import build_sam_parts
        >>> vit, prompt_encoder, mask_decoder = build_sam_parts("vit_tiny", 64)
        >>> model = IMedSAM(
        ...     image_encoder=AdaptedImageEncoder(vit),
        ...     prompt_path=BoxPromptPath(prompt_encoder, mask_decoder),
        ...     decoder=ImplicitSegmentationDecoder(),
        ... ).eval()
        >>> with torch.no_grad():
        ...     logits = model(torch.rand(1, 3, 80, 100), Prompts(boxes=[[[10.0, 20, 60, 70]]]))
        >>> logits.shape
        torch.Size([1, 1, 80, 100])
    """

    #: the kinds of :class:`~imedsam.networks.prompts.Prompts` this model takes; it refuses any other. The
    #: modality is used by a prompt path with a modality prompt, and taken unused by one without
    prompt_kinds: tuple[str, ...] = ("boxes", "points", "modality")
    #: ``"exact"`` (every pixel through the coarse INR, the method) or ``"adaptive"``: how :meth:`decode_all`
    #: decodes unless its ``mode`` says otherwise
    decode_mode: str = "exact"
    #: ``"auto"`` (bfloat16 where the hardware runs it natively), ``"float32"`` or ``"bfloat16"``: the image
    #: encoder's precision at inference, under ``torch.autocast``; training runs it in float32, except
    #: lite_medsam's frozen stem (no adapter, no gradient), which then runs in this precision too
    encoder_precision: str = "auto"

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        prompt_path: BoxPromptPath,
        decoder: ImplicitSegmentationDecoder | None,
        box_proposal: BoxProposalHead | None = None,
    ) -> None:
        super().__init__()
        check_parts(image_encoder, prompt_path, decoder)
        self.image_encoder = image_encoder
        self.prompt_path = prompt_path
        self.decoder = decoder
        self.box_proposal = box_proposal

    @property
    def image_size(self) -> int:
        """Side of the encoder's square input."""
        return self.image_encoder.image_size

    @property
    def num_classes(self) -> int:
        return 1 if self.decoder is None else self.decoder.num_classes

    @property
    def use_inr(self) -> bool:
        return self.decoder is not None

    def load_checkpoint(self, path: str | os.PathLike) -> IMedSAM:
        """Load a plain state dict of this whole model (as ``torch.save(model.state_dict(), path)`` writes)."""
        state = rename_legacy_keys(read_state_dict(path))
        keep_missing_optional_parts(state, self.state_dict(), os.fspath(path))
        encoder = type(self.image_encoder).__name__
        hint = f" (this model: {encoder}, image_size={self.image_size}, num_classes={self.num_classes})"
        load_state_dict_checked(self, state, os.fspath(path), hint)
        return self

    # -- encoder ------------------------------------------------------------------------------------------
    def encoder_version(self) -> tuple:
        """Identity and in-place version of every tensor of :attr:`image_encoder`: it changes with a checkpoint
        load, an optimiser step or a move to another device, so whatever is derived from the encoder's weights
        (cached encodings, a compiled graph) can be keyed on it."""
        encoder = self.image_encoder
        return tuple((id(t), t._version) for t in (*encoder.parameters(), *encoder.buffers()))

    @property
    def slab_depth(self) -> int:
        """The slices of a slab the encoder was made for: its volumetric adapters' (3DSAM-adapter), 1 without."""
        adapters = getattr(self.image_encoder, "volumetric_adapters", None)
        return 1 if adapters is None else adapters.slab_depth

    def encode(
        self, image: torch.Tensor, run_encoder: Callable[..., torch.Tensor] | None = None, slab_depth: int = 1
    ) -> ImageEncoding:
        """Encode ``image [B, 3, h, w]`` (RGB in [0, 1], any size); the result serves any number of boxes.

        ``run_encoder(canvas, slab_depth)`` takes the encoder's input (``[B, 3, S, S]``, preprocessed) to its
        embedding in place of :attr:`image_encoder` in PyTorch, e.g. an :class:`~imedsam.inference.OpenVINOEncoder`.
        ``slab_depth``: ``image`` is ``B / slab_depth`` slabs of consecutive slices, which the encoder's volumetric
        adapters, if any, see together (see :attr:`slab_depth`); 1: every image alone.
        """
        if not torch.jit.is_tracing():
            check_image(image)
        height, width = image.shape[-2:]
        size = self.image_size
        extent = (1.0, 1.0)
        if isinstance(self.image_encoder, AdaptedTinyViT):
            image, extent = letterbox(image, size)
        elif (height, width) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        check_slab_depth(image.shape[0], slab_depth)
        return ImageEncoding((run_encoder or self._run_encoder)(image, slab_depth), int(height), int(width), extent)

    def _run_encoder(self, image: torch.Tensor, slab_depth: int = 1) -> torch.Tensor:
        # a trace records float32: autocast's casts do not survive in a TorchScript graph
        if torch.jit.is_tracing() or resolve_precision(self.encoder_precision, image.device) == "float32":
            return self.image_encoder(image, slab_depth=slab_depth)
        if self.training:
            if isinstance(self.image_encoder, AdaptedTinyViT) and not self.image_encoder.stem_trains:
                return self.image_encoder(image, frozen_stem_dtype=torch.bfloat16, slab_depth=slab_depth)
            return self.image_encoder(image, slab_depth=slab_depth)
        with torch.autocast(image.device.type, dtype=torch.bfloat16):
            embedding = self.image_encoder(image, slab_depth=slab_depth)
        return embedding.float()  # the prompt path takes float32 maps; the decoder picks its own precision

    # -- decoder ------------------------------------------------------------------------------------------
    def _run_prompt_path(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None,
        modality_rows: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the implicit decoder's precision: its maps feed a decoder that runs in that precision anyway
        if (self.training or torch.jit.is_tracing() or self.decoder is None
                or resolve_precision(self.decoder.precision, embedding.device) == "float32"):  # fmt: skip
            return self.prompt_path(embedding, boxes, modality_rows, points)
        with torch.autocast(embedding.device.type, dtype=torch.bfloat16):
            box_features, mask_weights = self.prompt_path(embedding, boxes, modality_rows, points)
        return box_features.float(), None if mask_weights is None else mask_weights.float()

    def _class_ids(
        self, batch: int, num_prompts: int, device: torch.device, class_ids: torch.Tensor | None
    ) -> torch.Tensor:
        if class_ids is None:
            if self.num_classes == 1:
                return torch.zeros(batch * num_prompts, dtype=torch.long, device=device)
            if num_prompts > self.num_classes:
                raise ValueError(f"{num_prompts} prompts per image but only {self.num_classes} classes: pass class_ids")
            return torch.arange(num_prompts, device=device).repeat(batch)
        class_ids = torch.as_tensor(class_ids, device=device).long()
        if class_ids.shape != (batch, num_prompts):
            raise ValueError(f"class_ids must have shape {(batch, num_prompts)}, got {tuple(class_ids.shape)}")
        if class_ids.min() < 0 or class_ids.max() >= self.num_classes:
            raise ValueError(f"class_ids must be in [0, {self.num_classes - 1}], got {class_ids.unique().tolist()}")
        return class_ids.reshape(-1)

    def decode_all(
        self,
        encoding: ImageEncoding,
        prompts: Prompts | torch.Tensor,
        output_size: tuple[int, int] | None = None,
        class_ids: torch.Tensor | None = None,
        mode: str | None = None,
        query_lines: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> IMedSAMOutput:
        """Decode every prompt of every image: final and coarse logits, uncertainty and refined points.

        ``prompts``: a :class:`~imedsam.networks.prompts.Prompts` or its boxes alone, ``[B, N, 4]``.

        ``mode`` is ``"exact"`` or ``"adaptive"`` (default: the model's ``decode_mode``); training always
        decodes exactly. ``query_lines = (rows, columns)`` decodes only that sub-lattice of the output grid
        (see :meth:`ImplicitSegmentationDecoder.forward`); the output carries them.
        """
        mode = self.decode_mode if mode is None else mode
        if mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        embedding, height, width, extent = encoding
        batch = embedding.shape[0]
        prompts = as_prompts(prompts, embedding.device).only(self.prompt_kinds, type(self).__name__)
        boxes, points, point_labels = prompts.boxes, prompts.points, prompts.point_labels
        if output_size is None:
            output_size = (height, width)
        if not torch.jit.is_tracing():
            if boxes is not None:
                check_boxes(boxes, batch, height, width)
            if points is not None:
                check_points(points, point_labels, batch, height, width, with_boxes=boxes is not None)
            output_size = check_output_size(output_size)
        num_prompts = prompts.num_prompts
        ids = self._class_ids(batch, num_prompts, embedding.device, class_ids)
        # image pixels -> pixels of the encoder's input, where the image fills the top-left extent
        scale = embedding.new_tensor([self.image_size * extent[1] / width, self.image_size * extent[0] / height])
        prompt_boxes = None if boxes is None else (boxes.to(embedding.dtype) * scale.repeat(2)).reshape(-1, 4)
        prompt_points = None
        if points is not None:
            # a click names a pixel; SAM's encoder adds half a pixel of its input, so map the pixel's centre
            coords = (points.to(embedding.dtype) + 0.5) * scale - 0.5
            prompt_points = (coords.reshape(-1, *coords.shape[2:]), point_labels.reshape(-1, point_labels.shape[-1]))
        # one prompt per image: the embedding itself, whose decoder rows are then kept for its next prompt
        per_prompt = embedding if num_prompts == 1 else embedding.repeat_interleave(num_prompts, dim=0)
        modality_rows = self.prompt_path.modality_rows(prompts.modalities(), num_prompts, embedding.device)
        box_features, mask_weights = self._run_prompt_path(per_prompt, prompt_boxes, modality_rows, prompt_points)
        out_h, out_w = int(output_size[0]), int(output_size[1])
        if self.decoder is None:
            sam_masks = torch.einsum("pc,pchw->phw", mask_weights, box_features).unsqueeze(1)
            map_h, map_w = sam_masks.shape[-2:]
            # as LiteMedSAM does: crop the padding, then upsample to the output
            sam_masks = sam_masks[..., : round(map_h * extent[0]), : round(map_w * extent[1])]
            logits = F.interpolate(sam_masks, size=(out_h, out_w), mode="bilinear", align_corners=False)
            if query_lines is not None:
                rows, columns = check_query_lines(query_lines, out_h, out_w)
                logits = logits.index_select(-2, rows.to(logits.device)).index_select(-1, columns.to(logits.device))
            logits = logits.view(batch, num_prompts, *logits.shape[-2:])
            return IMedSAMOutput(logits, logits, None, None, query_lines)
        out = self.decoder(
            box_features, per_prompt, (out_h, out_w), ids, mode=mode, query_lines=query_lines, extent=extent,
            mask_weights=mask_weights if self.decoder.mask_prior else None,
        )  # fmt: skip
        shape = (batch, num_prompts, *out.logits.shape[-2:])
        refined = None if out.refined_index is None else out.refined_index.view(batch, num_prompts, -1)
        return IMedSAMOutput(
            out.logits.view(shape), out.coarse_logits.view(shape), out.uncertainty.view(shape), refined, query_lines
        )

    def decode(
        self,
        encoding: ImageEncoding,
        prompts: Prompts | torch.Tensor,
        output_size: tuple[int, int] | None = None,
        return_uncertainty: bool = False,
        class_ids: torch.Tensor | None = None,
        mode: str | None = None,
    ):
        """Logits ``[B, N, H, W]`` for ``prompts`` (a :class:`~imedsam.networks.prompts.Prompts` or boxes
        ``[B, N, 4]``), or ``(logits, uncertainty)``; ``mode`` as in :meth:`decode_all`."""
        if return_uncertainty and not self.use_inr:
            raise ValueError("the uncertainty map comes from the implicit decoder; this model has use_inr=False")
        out = self.decode_all(encoding, prompts, output_size, class_ids, mode)
        return (out.logits, out.uncertainty) if return_uncertainty else out.logits

    def forward(
        self,
        image: torch.Tensor,
        prompts: Prompts | torch.Tensor,
        output_size: tuple[int, int] | None = None,
        return_all: bool = False,
        query_lines: tuple[torch.Tensor, torch.Tensor] | None = None,
        slab_depth: int = 1,
    ):
        """Logits ``[B, N, H, W]``; with ``return_all`` the whole :class:`IMedSAMOutput` (what training needs,
        through ``forward`` so that DistributedDataParallel sees the call). ``prompts``: a
        :class:`~imedsam.networks.prompts.Prompts`, or its boxes alone (a tensor or a nested list).
        ``query_lines`` (with ``return_all``): decode only those rows and columns, see :meth:`decode_all`.
        ``slab_depth``: the images are slabs of that many slices (:meth:`encode`); each slice has its own prompts."""
        if query_lines is not None and not return_all:
            raise ValueError("query_lines need return_all=True: the output must carry the lines its maps cover")
        encoding = self.encode(image, slab_depth=slab_depth)
        if return_all:
            out = self.decode_all(encoding, prompts, output_size, query_lines=query_lines)
            if self.training and self.box_proposal is not None:
                out = out._replace(proposal_logits=self.box_proposal(encoding.embedding.detach()))
            return out
        return self.decode(encoding, prompts, output_size)

    def propose_boxes(self, encoding: ImageEncoding) -> BoxProposal:
        """A box for each image of ``encoding``, from the image alone: ``boxes [B, 4]`` in its pixels and a
        ``confidence [B]`` (see :func:`~imedsam.networks.box_proposal.boxes_from_foreground`).

        Raises ``RuntimeError`` when the model has no head or its head was never trained.
        """
        if self.box_proposal is None:
            raise RuntimeError("this model was built with box_proposal=False: it cannot propose boxes")
        if not self.box_proposal.is_trained:
            raise RuntimeError(
                "the box-proposal head is untrained (the checkpoint predates it, or the model was never fine-tuned): "
                "train the model with the bundle or the app's trainer, which train the head, or draw a box"
            )
        embedding, height, width, extent = encoding
        with torch.no_grad():
            logits = self.box_proposal(embedding.float())
        proposal = boxes_from_foreground(logits, extent, height, width)
        return BoxProposal(proposal.boxes.to(embedding.device), proposal.confidence.to(embedding.device))

