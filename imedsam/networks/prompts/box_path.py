"""The prompt path: SAM's prompt encoder and mask-decoder transformer give a box- or click-conditioned map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from segment_anything.modeling import MaskDecoder, PromptEncoder

from ..adapters.decoder_lora import DecoderLoRA
from .content import ContentPrompt
from .gated_tokens import ExtraTokenGates, run_two_way_transformer
from .modality import ModalityPrompt

__all__ = ["BoxPromptPath"]


class BoxPromptPath(nn.Module):
    """Turns an image embedding and a box, clicks, or both into SAM's upscaled, prompt-conditioned feature map.

    SAM's prompt encoder embeds the box corners and the clicks (foreground, background, and padding for prompts
    with fewer clicks, labels 1, 0 and -1 as in SAM); SAM's frozen two-way transformer mixes them with the
    image tokens; the trainable ``output_upscaling`` of the mask decoder gives a ``[32, 4g, 4g]`` map. With
    ``sam_mask=True`` the weights of SAM's single-mask head are also returned: their dot product with the map
    is SAM's own mask logit (the ``use_inr=False`` ablation, and the implicit decoder's mask prior).

    ``decoder_lora`` (a :class:`~imedsam.networks.adapters.decoder_lora.DecoderLoRA` already applied to
    ``mask_decoder.transformer``) makes the transformer itself trainable through low-rank updates, which clicks
    need (LiteMedSAM's transformer learned boxes only).

    MCP-MedSAM's two extra prompts are optional: a ``modality_prompt`` (a learned token per imaging modality) and
    a ``content_prompt`` (a token made from the embedding inside the box). Both enter the two-way transformer
    through zero-initialised gates (:mod:`~imedsam.networks.prompts.gated_tokens`), so until they are trained
    the path gives exactly SAM's map.

    Trainable: ``output_upscaling``, the two box-corner and the two click embeddings, ``not_a_point_embed`` and
    ``no_mask_embed`` (plus the first hypernetwork MLP for the SAM-mask ablation), the extra prompts with their
    gates, and the decoder LoRA's updates; the rest of SAM stays frozen. A click embedding learns only from
    batches that have clicks.

    Shapes: ``image_embeddings [P, 256, g, g]`` (one row per prompt), ``boxes [P, 4]`` as x0, y0, x1, y1 in
    pixels of the encoder's ``S x S`` input (or None: clicks alone), ``points = (coords [P, K, 2], labels [P, K])``
    with ``coords`` x, y in the same pixels (or None: the box alone), ``modality_rows [P]`` rows of the modality
    prompt (with one). Output ``[P, 32, 4g, 4g]`` (and the mask-head weights ``[P, 32]``).

    Example::

        >>> from imedsam.networks.presets import build_sam_parts
        >>> _, prompt_encoder, mask_decoder = build_sam_parts("vit_tiny", 64)
        >>> path = BoxPromptPath(prompt_encoder, mask_decoder)
        >>> path(torch.randn(2, 256, 4, 4), torch.tensor([[0.0, 0, 32, 32], [8, 8, 60, 40]]))[0].shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(
        self,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        sam_mask: bool = False,
        modality_prompt: ModalityPrompt | None = None,
        content_prompt: ContentPrompt | None = None,
        decoder_lora: DecoderLoRA | None = None,
    ) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.sam_mask = sam_mask
        self.requires_grad_(False)
        self.modality_prompt = modality_prompt
        self.content_prompt = content_prompt
        self.decoder_lora = decoder_lora
        extra = (modality_prompt is not None) + (content_prompt is not None)
        transformer = mask_decoder.transformer
        self.token_gates = ExtraTokenGates(len(transformer.layers), extra, transformer.layers[0].self_attn.num_heads) if extra else None
        trainable = [
            mask_decoder.output_upscaling,
            *prompt_encoder.point_embeddings,
            prompt_encoder.not_a_point_embed,
            prompt_encoder.no_mask_embed,
        ]
        if sam_mask:
            trainable.append(mask_decoder.output_hypernetworks_mlps[0])
        for module in trainable:
            module.requires_grad_(True)

    @property
    def out_channels(self) -> int:
        return self.mask_decoder.transformer_dim // 8

    def modality_rows(self, modalities: Sequence[str | None], num_boxes: int, device: torch.device) -> torch.Tensor | None:
        """Rows of the modality prompt, ``[B * num_boxes]`` for ``B`` images' modalities (None without the prompt)."""
        if self.modality_prompt is None:
            return None
        return self.modality_prompt.indices(modalities, device).repeat_interleave(num_boxes)

    def extra_tokens(
        self, image_embeddings: torch.Tensor, boxes: torch.Tensor | None, modality_rows: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``[P, E, C]``: the modality and content tokens this path has (None without any)."""
        tokens = []
        if self.modality_prompt is not None:
            if modality_rows is None:
                rows = image_embeddings.shape[0]
                modality_rows = torch.full((rows,), self.modality_prompt.any_index, device=image_embeddings.device)
            tokens.append(self.modality_prompt(modality_rows))
        if self.content_prompt is not None:
            if boxes is None:
                raise ValueError("this model's content prompt reads the image inside a box: give a box with the clicks")
            tokens.append(self.content_prompt(image_embeddings, boxes))
        return torch.stack(tokens, dim=1).to(image_embeddings.dtype) if tokens else None

    def forward(
        self,
        image_embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        modality_rows: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt-conditioned map and, with ``sam_mask``, the weights of SAM's mask head (else None)."""
        if boxes is None and points is None:
            raise ValueError("the prompt path needs boxes, points, or both")
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        decoder = self.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        # channels-last, as SAM's positional encoding already is: the transformer reads both as [P, HW, C]
        # token rows, which are then contiguous instead of strided across the map (about 15 % of its time)
        src = image_embeddings.contiguous(memory_format=torch.channels_last) + dense
        pos = self.prompt_encoder.get_dense_pe().expand_as(src)
        batch, channels, height, width = src.shape
        extra = self.extra_tokens(image_embeddings, boxes, modality_rows)
        if extra is None:
            token_out, src = decoder.transformer(src, pos, tokens)
        else:
            token_out, src = run_two_way_transformer(decoder.transformer, src, pos, tokens, extra, self.token_gates)
        # the tokens [P, HW, C] viewed as a channels-last map, not copied into NCHW: oneDNN's transposed
        # convolutions run several times faster on it, and the decoder reads the map channels-last
        upscaled = decoder.output_upscaling(src.view(batch, height, width, channels).permute(0, 3, 1, 2))
        if not self.sam_mask:
            return upscaled, None
        # Token 0 of the mask tokens is SAM's single-mask output (multimask_output=False).
        return upscaled, decoder.output_hypernetworks_mlps[0](token_out[:, 1, :])
