"""Checks of the network's inputs and of the parts it is built from, with errors that say what is wrong and
how to fix it."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["check_image", "check_boxes", "check_output_size", "check_parts", "check_query_lines"]


def check_image(image: torch.Tensor) -> None:
    """``image`` must be a finite ``[B, 3, H, W]`` floating tensor of RGB values in [0, 1]."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4:
        raise ValueError(f"image must have shape [B, 3, H, W], got {tuple(image.shape)}")
    if image.shape[1] != 3:
        raise ValueError(
            f"image must have 3 (RGB) channels, got {image.shape[1]} in shape {tuple(image.shape)}; "
            "repeat a grey image to 3 channels and drop an alpha channel"
        )
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a floating tensor in [0, 1], got dtype {image.dtype}; divide uint8 images by 255")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    low, high = image.min().item(), image.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(f"image values must be in [0, 1], got [{low:g}, {high:g}]; divide 8-bit images by 255")


def check_boxes(boxes: torch.Tensor, batch_size: int, height: int, width: int) -> None:
    """``boxes`` must be ``[B, N, 4]`` finite x0, y0, x1, y1 with ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"boxes must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [B, N, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if boxes.shape[0] != batch_size:
        raise ValueError(f"boxes are for {boxes.shape[0]} images but the image batch has {batch_size}")
    if boxes.shape[1] == 0:
        raise ValueError("boxes holds no box: every image needs at least one")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite values")
    flat = boxes.reshape(-1, 4).detach().cpu()
    for index, (x0, y0, x1, y1) in enumerate(flat.tolist()):
        where = f"box {index // boxes.shape[1]}/{index % boxes.shape[1]} ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where} has zero area or is inverted: x0 < x1 and y0 < y1 are required")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"{where} lies outside the {width}x{height} (WxH) image")


def check_points(
    points: torch.Tensor, labels: torch.Tensor, batch_size: int, height: int, width: int, with_boxes: bool = False
) -> None:
    """Clicks ``points [B, N, K, 2]`` (x, y) must be finite pixels of an ``height x width`` image, with
    ``labels [B, N, K]`` of 1 (foreground), 0 (background) or -1 (padding, ignored); a prompt without a box
    (``with_boxes=False``) needs a foreground click."""
    if points.shape[0] != batch_size:
        raise ValueError(f"points are for {points.shape[0]} images but the image batch has {batch_size}")
    if points.shape[1] == 0 or points.shape[2] == 0:
        raise ValueError("points holds no click: every prompt needs at least one")
    if not torch.isfinite(points).all():
        raise ValueError("points contain NaN or infinite values")
    bad_labels = ~((labels == 1) | (labels == 0) | (labels == -1))
    if bad_labels.any():
        raise ValueError(f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), got {labels[bad_labels].unique().tolist()}")
    x, y = points.unbind(-1)
    outside = (labels != -1) & ((x < 0) | (y < 0) | (x >= width) | (y >= height))
    if outside.any():
        image, prompt, click = (int(v) for v in outside.nonzero()[0])
        cx, cy = points[image, prompt, click].tolist()
        raise ValueError(f"click {image}/{prompt}/{click} ({cx:g}, {cy:g}) lies outside the {width}x{height} (WxH) image")
    if not with_boxes and not (labels == 1).any(-1).all():
        raise ValueError("a prompt without a box needs at least one foreground click (label 1)")


def check_query_lines(query_lines, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``query_lines = (rows, columns)`` must be non-empty 1-D integer indices into an ``height x width``
    output grid; returned as int64 tensors."""
    checked = []
    for lines, size, name in zip(query_lines, (height, width), ("row", "column")):
        lines = torch.as_tensor(lines)
        if lines.dim() != 1 or lines.numel() == 0 or lines.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"query {name}s must be a non-empty 1-D integer tensor, got {lines.dtype} of shape {tuple(lines.shape)}")
        if lines.min() < 0 or lines.max() >= size:
            raise ValueError(
                f"query {name}s must be in [0, {size - 1}] for an output of {size} {name}s, got {int(lines.min())}..{int(lines.max())}"
            )
        checked.append(lines.long())
    return checked[0], checked[1]


def check_output_size(output_size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in output_size)
    except (TypeError, ValueError):
        raise ValueError(f"output_size must be (height, width), got {output_size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return height, width


def check_parts(image_encoder: nn.Module, prompt_path: nn.Module, decoder: nn.Module | None) -> None:
    """Refuse an image encoder, a box prompt path and an implicit decoder (or None) that do not fit together
    (see :class:`~imedsam.networks.IMedSAM`), naming what to change."""
    channels = prompt_path.mask_decoder.transformer_dim
    if not hasattr(image_encoder, "image_size"):
        raise TypeError(f"the image encoder must say its input side as image_size; {type(image_encoder).__name__} does not")
    if decoder is None:
        if not prompt_path.sam_mask:
            raise ValueError("without an implicit decoder the model outputs SAM's mask: build the prompt path with sam_mask=True")
        return
    if decoder.mask_prior and not prompt_path.sam_mask:
        raise ValueError("a decoder with mask_prior refines SAM's mask logit: build the prompt path with sam_mask=True")
    box_channels = decoder.box_channels - int(decoder.mask_prior)
    if (box_channels, decoder.image_channels) != (prompt_path.out_channels, channels):
        raise ValueError(
            f"the decoder reads {box_channels} box-map and {decoder.image_channels} embedding channels; the prompt "
            f"path gives {prompt_path.out_channels} and {channels}"
        )
