"""Files that clients upload to the label server in the tests: real PNGs, and forged ones whose headers lie."""

import gzip
import io
import struct
import zlib

import nibabel as nib
import numpy as np
from PIL import Image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A decompression bomb's header: a PNG that claims ``width x height`` pixels in about 100 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def forged_nifti(shape, data: bytes = b"", dtype=np.int16) -> bytes:
    """A gzip NIfTI whose header claims ``shape`` (of ``dtype`` voxels) and holds only ``data``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + b"\0" * 4 + data, mtime=0)  # the same bytes on every call: xdist workers collect the same test ids
