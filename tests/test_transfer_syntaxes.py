"""Every transfer syntax the node accepts decodes, through load_volume, with permissive decoders only.

The compressed files are made by real encoders from uncompressed originals: DCMTK's dcmconv (native
syntaxes), dcmcjpeg (JPEG baseline, extended, lossless), dcmcjpls (JPEG-LS) and dcmcrle (RLE), and
pydicom's OpenJPEG encoder for JPEG 2000 (DCMTK has none). Lossless syntaxes must give back the
original voxels exactly; lossy ones must match an independent decoder (DCMTK's dcmdjpeg/dcmdjpls,
which the node does not use) to one stored value, and stay close to the original (JPEG-LS
near-lossless within its NEAR bound exactly). Originals: signed and unsigned 12-bit CT slices, a
signed 16-bit Enhanced CT (multi-frame) and 8-bit MR slices, as in tests/dicom_factory.py.
"""

from __future__ import annotations

import copy
import importlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from packaging.requirements import Requirement
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from reader import codecs
from reader.scp import TRANSFER_SYNTAXES
from reader.volume import Volume, load_volume
from tests.dicom_factory import SeriesIds, ct_series, enhanced_series, write_datasets
from tests.licensing import is_gpl, licence_of
from tests.peers import require_tool

SIZE = 64  # OpenJPEG needs >= 32 px for its default resolution levels
NEAR = 2  # JPEG-LS near-lossless: every sample within NEAR of the original (ISO 14495-1)
MIN_PSNR_DB = 30.0  # lossy: a wrong sign, byte order or bit depth gives far less


def _phantom(k: int, low: float, high: float) -> npt.NDArray[np.float64]:
    """A smooth disc with stripes and fixed noise between ``low`` and ``high``: like a body, not a ramp."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(y - SIZE / 2, x - SIZE / 2) / (SIZE / 2)
    noise = np.random.default_rng(k).normal(0.0, 0.01 * (high - low), (SIZE, SIZE))
    image = low + (high - low) * (np.clip(1 - r, 0, 1) ** 0.5 * 0.9 + 0.05 * np.sin(x / 5.0 + k)) + noise
    return np.clip(image, low, high)


def _ct_u12() -> list[Dataset]:
    datasets = ct_series(3, rows=SIZE, columns=SIZE, rescale=(1.0, -1024.0))
    for k, ds in enumerate(datasets):
        ds.set_pixel_data(_phantom(k, 0, 4095).astype(np.uint16), "MONOCHROME2", 12)
    return datasets


def _ct_s12() -> list[Dataset]:
    datasets = ct_series(3, rows=SIZE, columns=SIZE, rescale=(1.0, 0.0))
    for k, ds in enumerate(datasets):
        ds.set_pixel_data(_phantom(k, -1024, 2047).astype(np.int16), "MONOCHROME2", 12)
    return datasets


def _enhanced_s16() -> list[Dataset]:
    ds = enhanced_series(3, rows=SIZE, columns=SIZE, rescale=(1.0, 0.0))
    frames = np.stack([_phantom(k, -1024, 3071) for k in range(3)]).astype(np.int16)
    ds.set_pixel_data(frames, "MONOCHROME2", 16)
    return [ds]


def _mr_u8() -> list[Dataset]:
    datasets = ct_series(3, ids=SeriesIds(), rows=SIZE, columns=SIZE, modality="MR", rescale=None)
    for k, ds in enumerate(datasets):
        ds.set_pixel_data(_phantom(k, 0, 255).astype(np.uint8), "MONOCHROME2", 8)
    return datasets


SOURCES: dict[str, Callable[[], list[Dataset]]] = {
    "ct_u12": _ct_u12,
    "ct_s12": _ct_s12,
    "enhanced_s16": _enhanced_s16,
    "mr_u8": _mr_u8,
}
ALL = tuple(SOURCES)


@dataclass(frozen=True)
class Encoding:
    """How one transfer syntax is produced, from which originals, and what decoding must give back.

    ``tool`` is a DCMTK command line (input and output paths appended) or None for pydicom's own
    encoder with ``options``; ``reference`` is the DCMTK decoder a lossy result is compared with.
    """

    tool: tuple[str, ...] | None
    sources: tuple[str, ...] = ALL
    lossless: bool = True
    options: tuple[tuple[str, Any], ...] = ()
    reference: str | None = None
    max_error: int | None = None  # stored values, guaranteed by the codec


ENCODINGS: dict[UID, Encoding] = {
    ExplicitVRLittleEndian: Encoding(("dcmconv", "+te")),
    ImplicitVRLittleEndian: Encoding(("dcmconv", "+ti")),
    DeflatedExplicitVRLittleEndian: Encoding(("dcmconv", "+td")),
    ExplicitVRBigEndian: Encoding(("dcmconv", "+tb")),
    # Process 1 is 8-bit only; DCMTK would rescale 12-bit originals into 8 bits.
    JPEGBaseline8Bit: Encoding(("dcmcjpeg", "+eb", "+un"), ("mr_u8",), lossless=False, reference="dcmdjpeg"),
    JPEGExtended12Bit: Encoding(
        ("dcmcjpeg", "+ee", "+un"), ("ct_u12", "ct_s12", "mr_u8"), lossless=False, reference="dcmdjpeg"
    ),
    JPEGLossless: Encoding(("dcmcjpeg", "+el")),
    JPEGLosslessSV1: Encoding(("dcmcjpeg", "+e1")),
    JPEGLSLossless: Encoding(("dcmcjpls", "+el")),
    # DCMTK's near-lossless JPEG-LS refuses signed pixels.
    JPEGLSNearLossless: Encoding(
        ("dcmcjpls", "+en", "+md", str(NEAR), "+un"),
        ("ct_u12", "mr_u8"),
        lossless=False,
        reference="dcmdjpls",
        max_error=NEAR,
    ),
    JPEG2000Lossless: Encoding(None),
    JPEG2000: Encoding(None, lossless=False, options=(("j2k_cr", [8]),)),
    RLELossless: Encoding(("dcmcrle",)),
}

CASES = [
    pytest.param(uid, source, id=f"{uid.keyword}-{source}")
    for uid, encoding in ENCODINGS.items()
    for source in encoding.sources
]


def test_every_accepted_transfer_syntax_has_an_encoding() -> None:
    """The cases below cover exactly the transfer syntaxes the C-STORE SCP accepts: a syntax added
    to reader.scp.TRANSFER_SYNTAXES fails here until its decoding is proven too."""
    assert set(ENCODINGS) == set(TRANSFER_SYNTAXES)


def _run(args: list[str]) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed: {done.stderr or done.stdout}"


def _dcmtk(args: tuple[str, ...], sources: list[Path], out: Path) -> list[Path]:
    out.mkdir()
    exe = require_tool(args[0])
    for path in sources:
        _run([exe, *args[1:], str(path), str(out / path.name)])
    return [out / path.name for path in sources]


def _pydicom(uid: UID, options: dict[str, Any], sources: list[Path], out: Path) -> list[Path]:
    out.mkdir()
    for path in sources:
        ds = dcmread(path)
        ds.compress(uid, generate_instance_uid=False, **options)
        ds.save_as(out / path.name, enforce_file_format=True)
    return [out / path.name for path in sources]


def _psnr(decoded: npt.NDArray[np.float32], original: npt.NDArray[np.float32]) -> float:
    span = float(original.max() - original.min())
    mse = float(np.mean((decoded.astype(np.float64) - original) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(span**2 / mse)


def _stored_unit(volume: Volume) -> float:
    """HU of one stored value: the largest Rescale Slope (DCMTK's lossy modes may set one)."""
    return max(volume.rescale_slope)


@pytest.mark.parametrize(("uid", "source"), CASES)
def test_transfer_syntax_decodes_like_the_original(tmp_path: Path, uid: UID, source: str) -> None:
    """Files in this transfer syntax, made by a real encoder, load into the original's voxels:
    exactly when lossless; when lossy, within one stored value of DCMTK's decoder and close to the
    original (within NEAR for JPEG-LS near-lossless)."""
    encoding = ENCODINGS[uid]
    originals = write_datasets([copy.deepcopy(ds) for ds in SOURCES[source]()], tmp_path / "original")
    if encoding.tool is None:
        encoded = _pydicom(uid, dict(encoding.options), originals, tmp_path / "encoded")
    else:
        encoded = _dcmtk(encoding.tool, originals, tmp_path / "encoded")
    assert {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in encoded} == {uid}

    want = load_volume(originals).voxels
    got = load_volume(encoded)
    assert got.shape == want.shape
    if encoding.lossless:
        np.testing.assert_array_equal(got.voxels, want)
        return
    unit = _stored_unit(got)
    if encoding.max_error is not None:
        assert float(np.abs(got.voxels - want).max()) <= encoding.max_error * unit
    assert _psnr(got.voxels, want) >= MIN_PSNR_DB
    if encoding.reference is not None:
        reference = load_volume(_dcmtk((encoding.reference,), encoded, tmp_path / "reference")).voxels
        assert float(np.abs(got.voxels - reference).max()) <= unit


def _plugin_distributions(uid: UID, label: str) -> list[str]:
    """The distributions a pydicom decoding plugin needs for ``uid``, from its DECODER_DEPENDENCIES."""
    decoder = get_decoder(uid)
    # pydicom keeps each available plugin's function by label; its module names the dependencies.
    module = importlib.import_module(decoder._available[label].__module__)
    return [Requirement(dep).name for dep in module.DECODER_DEPENDENCIES[uid]]


@pytest.mark.parametrize("uid", [u for u in TRANSFER_SYNTAXES if u.is_compressed], ids=lambda u: u.keyword)
def test_the_node_decodes_with_permissive_plugins_only(uid: UID) -> None:
    """The plugins load_volume may use for a compressed syntax are available and none depends on a
    GPL distribution, even where one (pylibjpeg-libjpeg) is still installed."""
    decoder = get_decoder(uid)
    chosen = codecs.decoding_plugin(uid)
    labels = [chosen] if chosen else list(decoder.available_plugins)
    assert labels and set(labels) <= set(decoder.available_plugins), (labels, decoder.missing_dependencies)
    for label in labels:
        for dist in _plugin_distributions(uid, label):
            licence = licence_of(dist)
            assert not is_gpl(licence.text), f"{uid.name} may decode with {label}, which needs {licence}"
