"""Interactive prompted prediction with the image encoding cached between prompts."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from ..data.modalities import normalize_modality
from ..networks.imedsam import DECODE_MODES, IMedSAM, ImageEncoding
from ..networks.prompts.prompts import Prompts
from .openvino_encoder import ENCODER_ENGINES, OpenVINOEncoder, resolve_encoder_engine
from .prediction import Prediction

__all__ = ["Predictor", "image_to_tensor"]


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 (0..255) or float (0..1) array -> ``[1, 3, H, W]`` float32 tensor in [0, 1]."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be H x W x 3 (RGB), got shape {image.shape}; "
            "stack a grey image to 3 channels and drop an alpha channel"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype == np.uint8:
        array = image.astype(np.float32) / 255.0
    elif np.issubdtype(image.dtype, np.floating):
        array = image.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"a float image must be in [0, 1], got [{array.min():g}, {array.max():g}]; pass uint8 for 0..255 values"
            )
    else:
        raise TypeError(f"image dtype must be uint8 or floating, got {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).unsqueeze(0)


class Predictor:
    """Segment an image from prompts; the encoder runs once per image and model state.

    Encodings are kept in a small LRU cache keyed by the image's content and by the state of the encoder's
    parameters, so re-prompting an image, or coming back to a recent one, skips the encoder, while loading
    a checkpoint or training a step invalidates the cache.

    Args:
        model: an :class:`~imedsam.networks.IMedSAM`; it is put in eval mode.
        cache_size: how many image encodings to keep.
        max_decode_side: the largest side the decoder is queried at. A larger output is decoded at that size
            (aspect kept) and its logits and uncertainty upsampled bilinearly, so that time and memory stay
            bounded whatever the image's size; each :class:`Prediction`'s ``decode_size`` says what it decoded. None
            decodes every output pixel.
        decode_mode: ``"adaptive"`` (the default here) evaluates the implicit decoder on a coarse grid and,
            level by level, only near the predicted boundary; on the Kvasir-Sessile test split its masks are
            within 0.0003 mean Dice of ``"exact"``'s, which evaluates every output pixel (the method as published)
            at several times the cost (``docs/speed.md``). None follows the model's ``decode_mode``.
        encoder_engine: what runs the image encoder. ``"auto"`` (the default) is OpenVINO for the ``lite_medsam``
            encoder on a CPU (:class:`~imedsam.inference.OpenVINOEncoder`: the same function, several times
            faster than eager PyTorch; the first image after a change of weights converts it, seconds, or
            reads it from its disk cache) and PyTorch elsewhere; ``"torch"`` is the eager reference;
            ``"openvino"`` insists (an error where it does not apply).

    Example::

        >>> import numpy as np
        >>> from imedsam.networks import build_imedsam
        >>> predictor = Predictor(build_imedsam("vit_tiny", image_size=64))
        >>> predictor.set_image(np.zeros((50, 70, 3), np.uint8))  # False: the encoder ran
        False
        >>> probability, uncertainty = predictor.predict([5, 5, 40, 30])  # a Prediction unpacks as its two maps
        >>> probability.shape, uncertainty.shape
        ((50, 70), (50, 70))
        >>> prediction = predictor.predict(Prompts(boxes=[[[5, 5, 40, 30], [0, 0, 20, 20]]]), output_size=(100, 140))
        >>> prediction.probability.shape, prediction.decode_size, prediction.cache_hit
        ((2, 100, 140), (100, 140), False)
    """

    def __init__(
        self,
        model: IMedSAM,
        cache_size: int = 8,
        max_decode_side: int | None = 1024,
        decode_mode: str | None = "adaptive",
        encoder_engine: str = "auto",
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        if max_decode_side is not None and max_decode_side < 1:
            raise ValueError(f"max_decode_side must be a positive number of pixels or None, got {max_decode_side}")
        if decode_mode not in (None, *DECODE_MODES):
            raise ValueError(f"decode_mode must be one of {DECODE_MODES} or None (the model's), got {decode_mode!r}")
        if encoder_engine not in ENCODER_ENGINES:
            raise ValueError(f"encoder_engine must be one of {ENCODER_ENGINES}, got {encoder_engine!r}")
        self.model = model.eval()
        self.encoder_engine = encoder_engine
        self._openvino_encoder: OpenVINOEncoder | None = None
        self.cache_size = cache_size
        self.max_decode_side = max_decode_side
        self.decode_mode = decode_mode
        self._cache: OrderedDict[tuple, ImageEncoding] = OrderedDict()
        self._encoding: ImageEncoding | None = None
        self._encoding_cached = False  # whether set_image found self._encoding in the cache
        self._modality: str | None = None
        self.encoder_calls = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encoder_runner(self) -> OpenVINOEncoder | None:
        """The encoder to run in place of the model's PyTorch one, or None for that one."""
        if resolve_encoder_engine(self.encoder_engine, self.model, self.device) == "torch":
            return None
        if self._openvino_encoder is None:
            self._openvino_encoder = OpenVINOEncoder(self.model)
        return self._openvino_encoder

    def set_image(self, image: np.ndarray, modality: str | None = None) -> bool:
        """Encode ``image`` (``H x W x 3``, uint8 or float in [0, 1]) unless its encoding is cached.

        ``modality``: the image's imaging modality (a name of :data:`~imedsam.networks.prompts.MODALITY_NAMES`,
        or a DICOM ``Modality`` code such as ``"MR"``, see :func:`~imedsam.data.normalize_modality`); a model with
        a modality prompt uses it for every prompt of this image, None gives its "any" token.

        Returns True when the encoding came from the cache (the encoder did not run). If it raises, no image
        is set: :meth:`predict` refuses until a later call succeeds, rather than answer for the previous image.
        """
        self._encoding = None
        self._modality = normalize_modality(modality)
        tensor = image_to_tensor(image)
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        key = (digest, image.shape, str(image.dtype), self.model.encoder_version())
        cached = key in self._cache
        if cached:
            self._cache.move_to_end(key)
        else:
            with torch.no_grad():
                encoding = self.model.encode(tensor.to(self.device), run_encoder=self.encoder_runner())
            # keyed by the version after encoding: the first OpenVINO conversion traces the encoder, which bumps
            # its tensors' versions once without changing a weight, and the next prompt must find this encoding
            key = (digest, image.shape, str(image.dtype), self.model.encoder_version())
            self._cache[key] = encoding
            self.encoder_calls += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._encoding = self._cache[key]
        self._encoding_cached = cached
        return cached

    def set_encoding(self, encoding: ImageEncoding, modality: str | None = None, cached: bool = False) -> None:
        """Take an encoding made elsewhere (one image, e.g. a slice of a slab that was encoded with its neighbours,
        :class:`~imedsam.inference.slabs.SlabEncoder`) as the current image; ``modality`` as in :meth:`set_image`."""
        if encoding.embedding.shape[0] != 1:
            raise ValueError(f"set_encoding takes one image's encoding, got a batch of {encoding.embedding.shape[0]}")
        self._encoding = None
        self._modality = normalize_modality(modality)
        self._encoding = encoding
        self._encoding_cached = cached

    def propose_box(self) -> tuple[np.ndarray, float]:
        """The box the model's box-proposal head proposes for the current image, ``[x0, y0, x1, y1]`` in its
        pixels, and the proposal's confidence in [0, 1] (see :meth:`~imedsam.networks.IMedSAM.propose_boxes`).

        Raises ``RuntimeError`` before :meth:`set_image`, and when the model's head is missing or untrained.
        """
        if self._encoding is None:
            raise RuntimeError("call set_image() before propose_box()")
        proposal = self.model.propose_boxes(self._encoding)
        return proposal.boxes[0].cpu().numpy(), float(proposal.confidence[0])

    def predict(
        self, prompts: Prompts | np.ndarray | list, output_size: tuple[int, int] | None = None, class_id: int | None = None
    ) -> Prediction:
        """Probability and uncertainty maps for one box ``[x0, y0, x1, y1]``, several (``[N, 4]``) or a
        :class:`~imedsam.networks.Prompts` for this one image (``boxes [1, N, 4]``).

        Prompts are in pixels of the image given to :meth:`set_image`. The maps are ``H x W`` for one plain box,
        else ``N x H x W``, at the image's size or at ``output_size = (H, W)``: the implicit decoder is queried
        at that resolution directly (unless ``max_decode_side`` caps it), nothing is resized. Returns a
        :class:`~imedsam.inference.Prediction`, which unpacks as ``probability, uncertainty``.

        Raises ``RuntimeError`` before :meth:`set_image`; ``ValueError`` for a box of the wrong shape, prompts
        for more than one image, or a kind of prompt the model cannot use (see ``IMedSAM.prompt_kinds``).
        """
        if self._encoding is None:
            raise RuntimeError("call set_image() before predict()")
        single = False
        if not isinstance(prompts, Prompts):
            boxes = torch.as_tensor(np.asarray(prompts, dtype=np.float32))
            single = boxes.dim() == 1
            if single:
                boxes = boxes.unsqueeze(0)
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"box must be [x0, y0, x1, y1] or an N x 4 array, got shape {tuple(boxes.shape)}")
            prompts = Prompts(boxes=boxes.unsqueeze(0), modality=self._modality)
        elif prompts.modality is None and self._modality is not None:
            prompts = Prompts(boxes=prompts.boxes, points=prompts.points, point_labels=prompts.point_labels, modality=self._modality)
        if prompts.batch_size != 1:
            raise ValueError(f"the predictor segments one image: give Prompts for one ([1, N, ...]), got {prompts.batch_size}")
        class_ids = None if class_id is None else torch.full((1, prompts.num_prompts), int(class_id))
        size = tuple(int(v) for v in (output_size or (self._encoding.height, self._encoding.width)))
        decode_size = size
        if self.max_decode_side is not None and max(size) > self.max_decode_side:
            scale = self.max_decode_side / max(size)
            decode_size = tuple(max(1, round(v * scale)) for v in size)
        with torch.no_grad():
            logits, uncertainty = self.model.decode(
                self._encoding, prompts.to(self.device), decode_size, return_uncertainty=True, class_ids=class_ids,
                mode=self.decode_mode,
            )
            if decode_size != size:
                logits, uncertainty = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (logits, uncertainty))
        probability = torch.sigmoid(logits[0]).cpu().numpy()
        uncertainty = uncertainty[0].cpu().numpy()
        if single:
            probability, uncertainty = probability[0], uncertainty[0]
        return Prediction(probability, uncertainty, decode_size, self._encoding_cached)
