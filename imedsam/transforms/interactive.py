"""A dictionary transform for interactive servers: load an image, read the box prompt, cut the 2D plane."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..inference.planes import image_plane, is_picture, load_image_array, spatial_shape
from ..inference.planes import ImageReadError
from ..inference.prompts import resolve_box_prompt
from ..inference.volume import check_volume
from ..inference.volume_prompts import resolve_volume_prompts

__all__ = ["PromptPlaned", "PromptVolumed"]


class PromptPlaned(MapTransform):
    """Load the image at ``data[key]`` (a path) and the plane the request's box prompt points at.

    The request's ``box``, ``roi``, ``foreground`` and ``slice`` fields are read by
    :func:`imedsam.inference.resolve_box_prompt`; an optional ``window`` field (``[low, high]``) overrides
    the intensity window. Adds:

    - ``plane``: ``H x W x 3`` float32 RGB in [0, 1] (rows along the image's second array axis);
    - ``box``: ``[x0, y0, x1, y1]`` in pixels of ``plane``; ``box_source``: ``"box"``, ``"roi"`` or ``"clicks"``;
    - ``slice``: the volume slice, or None for a 2D picture;
    - ``spatial_shape``: the image's spatial shape in array order, for placing the result back;
    - ``data[key]``: the loaded ``MetaTensor`` (its affine is kept for a volume's result).

    With ``whole_image_if_unprompted``, a request without ``box``, ``roi`` or ``foreground`` gets the whole
    image as its box (a volume's middle slice unless ``slice`` says otherwise), as UGS scoring needs for
    images nobody has prompted. With ``modality_key``, ``data[modality_key]`` (a modality name or DICOM code, or
    None) picks a volume's intensity rule when no window is given (:func:`imedsam.inference.image_plane`).

    A bad prompt raises :class:`imedsam.inference.PromptError` and an unreadable image
    :class:`imedsam.inference.ImageReadError`, both ``ValueError`` with a message naming the problem.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        window: Sequence[float] | None = None,
        whole_image_if_unprompted: bool = False,
        modality_key: str | None = None,
    ) -> None:
        super().__init__(keys)
        self.window = window
        self.whole_image_if_unprompted = whole_image_if_unprompted
        self.modality_key = modality_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            array = load_image_array(path)
            planar = is_picture(path)
            shape = spatial_shape(array, planar)
            request = d
            if self.whole_image_if_unprompted and all(not d.get(k) for k in ("box", "roi", "foreground")):
                request = {"box": [0, 0, shape[0], shape[1]], "slice": d.get("slice", None if planar else shape[2] // 2)}
            prompt = resolve_box_prompt(request, shape)
            window = d.get("window") or self.window
            modality = d.get(self.modality_key) if self.modality_key else None
            d["plane"] = image_plane(array.numpy(), planar, prompt.slice_index, window, modality)
            d["box"], d["box_source"], d["slice"] = prompt.box, prompt.source, prompt.slice_index
            d["spatial_shape"] = shape
            d[key] = array
        return d


class PromptVolumed(MapTransform):
    """Load the volume at ``data[key]`` (a path) and the objects the request prompts in it.

    The request's ``box3d``, ``roi`` (and ``roi_layout``), ``box`` with ``slice``, and ``foreground`` /
    ``background`` clicks (and ``clicks``, what they mean) are read by :func:`imedsam.inference.resolve_volume_prompts`. Adds ``volume``
    (``(I, J, K)`` array), ``object_prompts`` (one :class:`~imedsam.inference.ObjectPrompt` per object) and
    ``window`` (the request's ``[low, high]``, else this transform's, else None: the default rule);
    ``data[key]`` becomes the loaded ``MetaTensor``, whose affine the result keeps.

    A picture is refused with :class:`~imedsam.inference.ImageReadError` (the 2D task serves those), and a bad
    prompt with :class:`~imedsam.inference.PromptError`.
    """

    def __init__(self, keys: KeysCollection = "image", window: Sequence[float] | None = None) -> None:
        super().__init__(keys)
        self.window = window

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = str(d[key])
            if is_picture(path):
                raise ImageReadError(f"{path} is a 2D picture: the 3D task takes volumes; prompt it with the 2D task")
            image = load_image_array(path)
            volume = check_volume(image.numpy())
            d["object_prompts"] = resolve_volume_prompts(d, volume.shape)
            d["volume"], d["window"], d[key] = volume, d.get("window") or self.window, image
        return d
