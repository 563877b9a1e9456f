"""Malformed and hostile input: property-based tests of the receive, assemble and volume paths, and
a table of hostile datasets sent to a real ``reader serve`` between valid studies.

- Volume and assemble (in process, hypothesis): a small valid CT series is damaged by a random list
  of mutations (missing or absurd attributes, truncated pixel data, huge dimensions, mixed
  geometry, non-image SOP class, wrong transfer syntax); ``load_volume`` and ``summarize_series``
  either succeed with a consistent result or raise ``InputRejected``, never anything else.
- Receive (a real node, hypothesis): C-STORE with arbitrary Study/Series Instance UIDs answers
  Success exactly when both are valid UIDs (PS3.5 9.1), 0xC000 otherwise, writes nothing outside
  ``incoming/<study>/<series>/``, and the association keeps working.
- Hostile table (a real node): every hostile dataset gets a named DIMSE status, a rejected
  presentation context, or a recorded series rejection; the node keeps serving and the valid
  studies sent before and after are processed.
"""

from __future__ import annotations

import copy
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    CTImageStorage,
    EncapsulatedPDFStorage,
    Verification,
)

from reader import dimse
from reader.assemble import summarize_series
from reader.errors import InputRejected
from reader.jobs import JobStore, SeriesStatus
from reader.requestor import keep_responses_for_caller
from reader.spool import Spool, check_uid
from reader.volume import load_volume
from tests.dicom_factory import ct_series, write_datasets
from tests.node_process import ReaderNode
from tests.peers import wait_until
from tests.reliability import Study, serve_config, write_fixture_model, write_study

DEADLINE_S = 60.0
MPEG2_MAIN_PROFILE = UID("1.2.840.10008.1.2.4.100")

# --- mutations ---------------------------------------------------------------------------------

_KEYWORDS = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient",
             "RescaleSlope", "RescaleIntercept", "BitsAllocated", "PixelRepresentation", "SOPClassUID",
             "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
             "PixelData", "SamplesPerPixel", "NumberOfFrames", "Modality", "SliceThickness")
_ODD_VALUES: tuple[Any, ...] = ("", "abc", "-1", "0", "1e309", "nan", "65535", "4294967295",
                                "1\\2", "../../etc/passwd", 0, -5, 65535)


def _delete(keyword: str) -> Callable[[list[Dataset]], None]:
    def apply(series: list[Dataset]) -> None:
        if keyword in series[0]:
            delattr(series[0], keyword)
    return apply


def _set(keyword: str, value: Any, index: int) -> Callable[[list[Dataset]], None]:
    def apply(series: list[Dataset]) -> None:
        ds = series[index % len(series)]
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            assume(False)  # pydicom refuses the value outright: no peer could encode it either
    return apply


def _truncate(index: int, keep: int) -> Callable[[list[Dataset]], None]:
    def apply(series: list[Dataset]) -> None:
        ds = series[index % len(series)]
        # another mutation may have set Pixel Data to a number already: only bytes can be cut
        if "PixelData" in ds and isinstance(ds.PixelData, bytes):
            ds.PixelData = ds.PixelData[: keep % max(1, len(ds.PixelData))]
    return apply


def _tilt(index: int) -> Callable[[list[Dataset]], None]:
    def apply(series: list[Dataset]) -> None:
        series[index % len(series)].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    return apply


def _non_image(series: list[Dataset]) -> None:
    series[0].SOPClassUID = BasicTextSRStorage


def _transfer_syntax(series: list[Dataset]) -> None:
    series[0].file_meta.TransferSyntaxUID = MPEG2_MAIN_PROFILE


_MUTATIONS = st.one_of(
    st.builds(_delete, st.sampled_from(_KEYWORDS)),
    st.builds(_set, st.sampled_from(_KEYWORDS), st.sampled_from(_ODD_VALUES), st.integers(0, 5)),
    st.builds(_truncate, st.integers(0, 5), st.integers(0, 400)),
    st.builds(_tilt, st.integers(0, 5)),
    st.just(_non_image),
    st.just(_transfer_syntax),
)


def _write(series: list[Dataset], folder: Path) -> list[Path]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = []
    for i, ds in enumerate(series):
        path = folder / f"{i}.dcm"
        try:
            ds.save_as(path, enforce_file_format=False)
        except (ValueError, TypeError, OverflowError, AttributeError, KeyError, OSError, struct.error):
            assume(False)  # pydicom cannot even write it: not an input a peer could send
        paths.append(path)
    return paths


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every odd value we set
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_MUTATIONS, min_size=1, max_size=4), n_slices=st.integers(1, 6))
def test_damaged_series_load_or_are_rejected(tmp_path: Path, mutations: list[Callable[[list[Dataset]], None]],
                                             n_slices: int) -> None:
    """A damaged series either yields a summary and a volume of the stated shape with finite HU, or
    raises InputRejected with a reason; no other exception escapes assemble or volume."""
    series = ct_series(n_slices, rows=8, columns=6)
    for mutate in mutations:
        mutate(series)
    paths = _write(series, tmp_path / "fuzz")
    try:
        summary = summarize_series("1.2.3", "1.2.3.4", paths)
        assert summary.instance_count >= 1
    except InputRejected as exc:
        assert exc.reason
    try:
        volume = load_volume(paths)
    except InputRejected as exc:
        assert exc.reason
        return
    assert volume.voxels.ndim == 3 and volume.voxels.shape[0] == len(volume.sources)
    assert np.isfinite(volume.voxels).all()


# --- a real node ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReaderNode]:
    """One ``reader serve`` without destinations (results kept), for this module's network tests."""
    workdir = tmp_path_factory.mktemp("fuzz-node")
    model = write_fixture_model(workdir / "model")
    served = ReaderNode(workdir / "node", config_text=serve_config(model, min_free_disk_mb=0))
    yield served
    assert served.stop() == 0, served.log_tail()


def _associate(node: ReaderNode, *contexts: tuple[str, str]) -> Association:
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, transfer in contexts:
        ae.add_requested_context(abstract, transfer)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established, "the node refused an association"
    keep_responses_for_caller(assoc)  # several requests on one association (reader.requestor)
    return assoc


_UID_TEXT = st.one_of(
    st.from_regex(r"\A[1-9][0-9]{0,8}(\.[0-9]{1,8}){1,6}\Z"),
    st.text(alphabet="0123456789./\\ abcxyz\0-_~", max_size=70),
    st.sampled_from(["../../../../tmp/escape", "..", ".", "/etc", "1." * 40 + "1", "1..2", "", "1.2.3 "]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(study_uid=_UID_TEXT, series_uid=_UID_TEXT)
def test_store_answers_success_only_for_valid_uids(node: ReaderNode, study_uid: str,
                                                   series_uid: str) -> None:
    """C-STORE answers Success exactly when Study and Series Instance UIDs are valid, 0xC000
    otherwise, and a stored instance lands under incoming/<study>/<series>/ only."""
    ds = ct_series(1, rows=4, columns=4)[0]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    try:  # the oracle: the spool's own UID rule (PS3.5 9.1; trailing padding is not part of a UID)
        folder: Path | None = (node.data_dir / "incoming" / check_uid(study_uid, "study")
                               / check_uid(series_uid, "series"))
    except InputRejected:
        folder = None
    valid = folder is not None
    assoc = _associate(node, (CTImageStorage, ExplicitVRLittleEndian), (Verification, ExplicitVRLittleEndian))
    try:
        status = assoc.send_c_store(ds)
        assert "Status" in status, "no answer to a C-STORE"
        assert status.Status == (dimse.SUCCESS if valid else dimse.CANNOT_UNDERSTAND)
        assert assoc.send_c_echo().Status == dimse.SUCCESS
    finally:
        assoc.release()
    if folder is not None:
        assert (folder / f"{ds.SOPInstanceUID}.dcm").is_file()
    for path in node.data_dir.rglob("*"):
        assert path.resolve().is_relative_to(node.data_dir.resolve())


def _send_all(node: ReaderNode, datasets: list[Dataset],
              transfer: str = ExplicitVRLittleEndian) -> list[int]:
    assoc = _associate(node, (CTImageStorage, transfer))
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _state(node: ReaderNode, series_uid: str) -> tuple[SeriesStatus, str] | None:
    state = JobStore(Spool(node.data_dir)).series_state(series_uid)
    return None if state is None or state.status is SeriesStatus.QUEUED else (state.status, state.reason)


def _valid_study_processed(node: ReaderNode, study: Study) -> None:
    assert _send_all(node, [pydicom.dcmread(f) for f in study.files]) == [dimse.SUCCESS] * len(study.files)
    wait_until(lambda: _state(node, study.series_uid) is not None, DEADLINE_S, "a valid study processed")
    assert _state(node, study.series_uid) == (SeriesStatus.DONE, "")


def test_hostile_datasets_get_clear_answers_and_valid_studies_survive(node: ReaderNode,
                                                                      tmp_path: Path) -> None:
    """Truncated pixels, absurd dimensions, missing, mismatched and escaping UIDs, mixed geometry,
    an unsupported transfer syntax and non-image SOP classes each get a named DIMSE status, a
    rejected presentation context or a recorded rejection, while valid studies before and after
    them are processed and the node keeps answering."""
    _valid_study_processed(node, write_study(tmp_path / "before"))

    refused: dict[str, Dataset] = {}
    base = ct_series(1, rows=4, columns=4)[0]
    for label, keyword, value in (("missing study UID", "StudyInstanceUID", None),
                                  ("letters in series UID", "SeriesInstanceUID", "1.2.abc"),
                                  ("escaping series UID", "SeriesInstanceUID", "../../../../tmp/escape"),
                                  ("overlong study UID", "StudyInstanceUID", "1." * 40 + "1")):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
        refused[label] = ds
    statuses = _send_all(node, list(refused.values()))
    assert statuses == [dimse.CANNOT_UNDERSTAND] * len(refused), dict(zip(refused, statuses, strict=True))

    rejected: dict[str, tuple[list[Dataset], str]] = {}
    truncated = ct_series(20, rows=16, columns=16)
    truncated[7].PixelData = truncated[7].PixelData[:100]
    rejected["truncated pixel data"] = (truncated, "")
    absurd = ct_series(20, rows=16, columns=16)
    for ds in absurd:
        ds.Rows = ds.Columns = 65535
    rejected["absurd dimensions"] = (absurd, "absurd_dimensions")
    mixed = ct_series(20, rows=16, columns=16)
    mixed[10].ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    rejected["mixed geometry"] = (mixed, "")
    for label, (series, _reason) in rejected.items():
        assert _send_all(node, series) == [dimse.SUCCESS] * len(series), label
    for label, (series, reason) in rejected.items():
        uid = str(series[0].SeriesInstanceUID)
        wait_until(lambda uid=uid: _state(node, uid) is not None, DEADLINE_S, f"{label} judged")  # type: ignore[misc]
        outcome = _state(node, uid)
        assert outcome is not None and outcome[0] is SeriesStatus.SKIPPED, (label, outcome)
        assert outcome[1] and reason in outcome[1], (label, outcome)

    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, MPEG2_MAIN_PROFILE)
    ae.add_requested_context(BasicTextSRStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(EncapsulatedPDFStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assert accepted == {str(Verification)}, "unsupported transfer syntax or non-image SOP class accepted"
        results = {str(c.abstract_syntax): c.result for c in assoc.rejected_contexts}
        assert results == {str(CTImageStorage): 0x04, str(BasicTextSRStorage): 0x03,  # PS3.8 Table 9-18
                           str(EncapsulatedPDFStorage): 0x03}, results
        assert assoc.send_c_echo().Status == dimse.SUCCESS
    finally:
        assoc.release()

    _valid_study_processed(node, write_study(tmp_path / "after"))
    assert not Path("/tmp/escape").exists()
    assert node.process.poll() is None
    written = write_datasets([base], tmp_path / "probe")
    assert len(written) == 1
