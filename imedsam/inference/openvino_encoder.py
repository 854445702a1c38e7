"""The ``lite_medsam`` image encoder run by OpenVINO on CPU: the same function as eager PyTorch, several times
faster (``docs/speed.md``).

Eager PyTorch runs TinyViT's many small convolutions, reshapes and windowed attentions one operator at a
time; OpenVINO compiles the whole graph for the CPU it finds, fusing them. The converted graph holds the
encoder's weights as they are, so it is rebuilt when they change, and kept on disk keyed by their hash:
converting takes seconds, reading a kept one a fraction of that.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..networks.frequency_adapter import frequency_image
from ..networks.adapters.volumetric import check_slab_depth
from ..networks.imedsam import IMedSAM
from ..networks.precision import resolve_precision
from ..networks.tiny_vit_encoder import AdaptedTinyViT

__all__ = ["ENCODER_ENGINES", "OpenVINOEncoder", "default_cache_dir", "resolve_encoder_engine"]

logger = logging.getLogger(__name__)

ENCODER_ENGINES = ("auto", "torch", "openvino")
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


def default_cache_dir() -> Path:
    """``$IMEDSAM_CACHE_DIR/openvino``, else ``~/.cache/imedsam/openvino`` (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get("IMEDSAM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "imedsam"
    )
    return Path(root) / "openvino"


def resolve_encoder_engine(engine: str, model: IMedSAM, device: torch.device | str) -> str:
    """``"torch"`` or ``"openvino"``: ``engine`` itself, or what ``"auto"`` means for ``model`` on ``device``.

    ``auto`` is OpenVINO for the ``lite_medsam`` encoder on a CPU and PyTorch elsewhere (a GPU, or the SAM
    ViT presets, which the OpenVINO path does not cover). Asking for ``openvino`` where it does not apply is
    an error, not a quiet switch to PyTorch.
    """
    if engine not in ENCODER_ENGINES:
        raise ValueError(f"encoder_engine must be one of {ENCODER_ENGINES}, got {engine!r}")
    applies = isinstance(model.image_encoder, AdaptedTinyViT) and torch.device(device).type == "cpu"
    if engine == "auto":
        return "openvino" if applies else "torch"
    if engine == "openvino" and not applies:
        raise ValueError(
            f"encoder_engine 'openvino' runs the lite_medsam encoder on a CPU; this model has "
            f"{type(model.image_encoder).__name__} on {torch.device(device)}: use 'torch' or 'auto'"
        )
    return engine


def _import_openvino():
    try:
        import openvino
    except ImportError as error:
        raise ImportError("encoder_engine 'openvino' needs OpenVINO: pip install openvino (an imedsam dependency)") from error
    return openvino


class _EncoderGraph(nn.Module):
    """The graph handed to OpenVINO: the letterboxed canvas and, with a frequency adapter, its frequency map
    in; the embedding out. The frequency map is an input because the converters have no complex FFT: it is
    computed in PyTorch (:func:`_graph_inputs`).
    """

    def __init__(self, encoder: AdaptedTinyViT, slab_depth: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.slab_depth = slab_depth

    def forward(self, image: torch.Tensor, frequency: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(image, frequency=frequency, slab_depth=self.slab_depth)


def _graph_inputs(image: torch.Tensor, fa_mode: str) -> tuple[torch.Tensor, ...]:
    return (image,) if fa_mode == "none" else (image, frequency_image(image, fa_mode))


class OpenVINOEncoder:
    """Run an :class:`~imedsam.networks.IMedSAM`'s ``lite_medsam`` encoder with OpenVINO, as a drop-in for
    ``model.image_encoder`` at inference: ``model.encode(image, run_encoder=OpenVINOEncoder(model))``.

    The graph is converted from the encoder's current weights (in float32) and compiled in the precision
    ``model.encoder_precision`` resolves to on this CPU (``auto``: bfloat16 where it is native, see
    :func:`~imedsam.networks.precision.resolve_precision`). Before each call the weights' versions are
    compared with those it was built from; a checkpoint load or a training step makes it rebuild. In float32
    it matches the eager encoder to about 1e-5 (``tests/integration/test_openvino_encoder.py``).

    Args:
        model: the network whose encoder to run; it is read, never changed.
        cache_dir: where converted graphs are kept, named by the SHA-256 of the encoder's weights and
            OpenVINO's version (default :func:`default_cache_dir`); None keeps nothing on disk.
        num_threads: OpenVINO's inference threads (default: ``torch.get_num_threads()``, so that
            ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` limit both engines alike).
        kept_graphs: how many converted graphs the cache keeps, the most recently used (each about 27 MB,
            plus OpenVINO's compiled form of each precision used, about 90 MB).

    Shapes: ``[B, 3, S, S]`` letterboxed canvas (``S = model.image_size``) -> ``[B, 256, S / 4, S / 4]``.

    Example::

        >>> from imedsam.networks import build_imedsam
        >>> model = build_imedsam().eval()
        >>> encoder = OpenVINOEncoder(model, cache_dir=None)
        >>> model.encode(torch.rand(1, 3, 50, 60), run_encoder=encoder).embedding.shape
        torch.Size([1, 256, 64, 64])
    """

    def __init__(
        self,
        model: IMedSAM,
        cache_dir: str | os.PathLike | None = "default",
        num_threads: int | None = None,
        kept_graphs: int = 4,
    ) -> None:
        resolve_encoder_engine("openvino", model, next(model.parameters()).device)
        self._openvino = _import_openvino()
        self.model = model
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir is not None else None)
        self._core = self._openvino.Core()
        if self.cache_dir is not None:  # OpenVINO's own cache of compiled graphs: a kept graph then loads faster
            self._core.set_property({"CACHE_DIR": str(self.cache_dir / "compiled")})
        self.num_threads = num_threads
        self.kept_graphs = kept_graphs
        self.conversions = 0  # graphs converted from PyTorch (not read from the cache) by this instance
        self._compiled: dict[int, tuple[tuple, object]] = {}  # slab depth -> (what it was compiled for, graph)

    def _weights_digest(self, slab_depth: int = 1) -> str:
        # the slab depth is the graph's batch, and with volumetric adapters also what they mix
        key = f"openvino {self._openvino.__version__} size {self.model.image_size} slab {slab_depth}"
        digest = hashlib.sha256(key.encode())
        for name, tensor in self.model.image_encoder.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:32]

    def _convert(self, slab_depth: int):
        size = self.model.image_size
        encoder = self.model.image_encoder
        example = _graph_inputs(torch.rand(slab_depth, 3, size, size), encoder.fa_mode)
        graph = _EncoderGraph(encoder, slab_depth).eval()
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # TinyViT's shape checks turn into constants in the trace: right, for a graph of one fixed shape
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                converted = self._openvino.convert_model(graph, example_input=example)
        finally:
            encoder.train(was_training)
        self.conversions += 1
        return converted

    def _graph(self, slab_depth: int):
        if self.cache_dir is None:
            return self._convert(slab_depth)
        path = self.cache_dir / f"encoder-{self._weights_digest(slab_depth)}.xml"
        if path.is_file():
            try:
                graph = self._core.read_model(str(path))
                path.touch()  # recently used: the last to be pruned
                return graph
            except RuntimeError as error:  # a cache entry is derived data: rebuild it, and say so
                logger.warning("OpenVINO cache entry %s is unreadable (%s); converting the encoder again", path, error)
        logger.info("converting the image encoder to OpenVINO (once per set of weights; kept in %s)", self.cache_dir)
        converted = self._convert(slab_depth)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as staging:
            staged = Path(staging) / "encoder.xml"
            # float32 on disk: the default would halve the weights to float16, a lossy change of the model
            self._openvino.save_model(converted, str(staged), compress_to_fp16=False)
            # the .bin first: a reader finding the .xml must find its weights
            os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(staged, path)
        self._prune()
        return converted

    def _prune(self) -> None:
        """Keep the :attr:`kept_graphs` most recently used graphs and twice as many compiled ones: every
        retraining adds a set of weights, and a cache must not grow without bound."""
        graphs = sorted(self.cache_dir.glob("encoder-*.xml"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in graphs[self.kept_graphs :]:
            stale.with_suffix(".bin").unlink(missing_ok=True)
            stale.unlink(missing_ok=True)
        compiled = sorted((self.cache_dir / "compiled").glob("*.blob"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in compiled[2 * self.kept_graphs :]:
            stale.unlink(missing_ok=True)

    def _compiled_model(self, slab_depth: int):
        device = next(self.model.parameters()).device
        precision = resolve_precision(self.model.encoder_precision, device)
        threads = self.num_threads or torch.get_num_threads()
        key = (self.model.encoder_version(), precision, threads)
        if slab_depth not in self._compiled or self._compiled[slab_depth][0] != key:
            if any(built != key for built, _ in self._compiled.values()):  # other weights: those graphs are stale
                self._compiled.clear()
            config = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_NUM_THREADS": threads}  # fmt: skip
            self._compiled[slab_depth] = (key, self._core.compile_model(self._graph(slab_depth), "CPU", config))
        return self._compiled[slab_depth][1]

    def __call__(self, image: torch.Tensor, slab_depth: int = 1) -> torch.Tensor:
        """The embeddings of ``image`` ``[B, 3, S, S]``, ``B / slab_depth`` slabs of consecutive slices (one graph
        is compiled per slab depth)."""
        size = self.model.image_size
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, size, size):
            raise ValueError(f"OpenVINOEncoder takes the letterboxed canvas [B, 3, {size}, {size}], got {tuple(image.shape)}")
        check_slab_depth(image.shape[0], slab_depth)
        compiled = self._compiled_model(slab_depth)
        inputs = _graph_inputs(image.detach().float().cpu(), self.model.image_encoder.fa_mode)
        request = compiled.create_infer_request()
        outputs = [  # the graph is compiled for one slab: its static shape is the fastest
            torch.from_numpy(request.infer({k: x[i : i + slab_depth].numpy() for k, x in enumerate(inputs)})[0].copy())
            for i in range(0, image.shape[0], slab_depth)
        ]
        return torch.cat(outputs).to(next(self.model.parameters()).device)
