"""Which decoder turns each accepted transfer syntax into pixels, with no GPL code on the way.

pydicom 3 decodes the JPEG process family (PS3.5 A.4.1: Baseline 1.2.840.10008.1.2.4.50, Extended
12-bit .51, Lossless .57, Lossless SV1 .70) only with pylibjpeg-libjpeg (GPL-3.0), GDCM or Pillow;
GDCM's wheel and pydicom's plugin for it refuse 12-bit JPEG Extended, and Pillow decodes 8-bit DCT
only. imagecodecs (BSD-3-Clause) wraps libjpeg-turbo 3, which decodes all four: 8- and 12-bit DCT
and 2-16-bit lossless. This module is a pydicom decoding plugin for them (``is_available``,
``DECODER_DEPENDENCIES``, ``decode_frame``: the interface of pydicom's decoder plugins), added to
pydicom's decoders by :func:`register` under the label ``"imagecodecs"``.

:func:`decoding_plugin` names the plugin the node decodes a transfer syntax with: ``"imagecodecs"``
for the JPEG family and ``"pyjpegls"`` (CharLS, BSD-3-Clause) for JPEG-LS, so that a GPL decoder
left installed (pylibjpeg-libjpeg, which pydicom would try first) is never reached and no other
plugin fails first (pydicom logs each failed attempt with a traceback); ``""`` elsewhere, leaving
pydicom's order among the installed plugins, all permissive: pylibjpeg-openjpeg then Pillow for
JPEG 2000, pylibjpeg-rle then pydicom's own decoder for RLE, numpy for the native syntaxes.
LICENSES.md lists each decoder's licence; tests/test_transfer_syntaxes.py decodes every transfer
syntax the node accepts (reader.scp.TRANSFER_SYNTAXES) against the uncompressed original.
"""

from __future__ import annotations

import threading

import imagecodecs
import numpy as np
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder
from pydicom.uid import (
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

__all__ = ["JPEG_SYNTAXES", "PLUGIN", "decode_frame", "decoding_plugin", "is_available", "register"]

PLUGIN = "imagecodecs"
JPEG_SYNTAXES: tuple[UID, ...] = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)

# pydicom reads this when the plugin is unavailable, to say what is missing.
DECODER_DEPENDENCIES: dict[UID, tuple[str, ...]] = {uid: ("imagecodecs>=2024.1.1",) for uid in JPEG_SYNTAXES}

_lock = threading.Lock()
_registered = False


def is_available(uid: str) -> bool:
    """True when this plugin can decode ``uid``: a JPEG-family syntax and imagecodecs' libjpeg-turbo."""
    return uid in JPEG_SYNTAXES and bool(imagecodecs.JPEG8.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One monochrome JPEG frame as little-endian stored values in the dataset's container size.

    Signed images come back as their bit patterns, as from every other JPEG plugin: pydicom
    reinterprets and sign-extends them from Pixel Representation and Bits Stored. Colour is left
    to Pillow (the node refuses Samples per Pixel other than 1 before decoding anyway).
    """
    if runner.samples_per_pixel != 1:
        raise NotImplementedError(f"the {PLUGIN} plugin decodes monochrome JPEG only")
    if runner.bits_allocated not in (8, 16):
        raise NotImplementedError(f"the {PLUGIN} plugin cannot fill Bits Allocated {runner.bits_allocated}")
    frame = imagecodecs.jpeg8_decode(src)
    if frame.shape != (runner.rows, runner.columns):
        raise ValueError(f"JPEG frame is {frame.shape}, the dataset says {(runner.rows, runner.columns)}")
    container = np.dtype("<u2") if runner.bits_allocated == 16 else np.dtype("u1")
    return bytes(frame.astype(container, copy=False).tobytes())


def register() -> None:
    """Add this plugin to pydicom's JPEG-family decoders (once per process; later calls do nothing)."""
    global _registered  # noqa: PLW0603 - pydicom's decoders are process-global; so is this flag
    with _lock:
        if _registered:
            return
        for uid in JPEG_SYNTAXES:
            get_decoder(uid).add_plugin(PLUGIN, (__name__, "decode_frame"))
        _registered = True


_CHOSEN: dict[str, str] = {
    **dict.fromkeys(JPEG_SYNTAXES, PLUGIN),
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}


def decoding_plugin(transfer_syntax: str) -> str:
    """The pydicom plugin label the node decodes ``transfer_syntax`` with ("" = pydicom's order)."""
    return _CHOSEN.get(transfer_syntax, "")
