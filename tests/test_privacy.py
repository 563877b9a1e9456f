"""Privacy: a full study through a real ``reader serve`` leaves no patient identity in its output.

The node runs at debug level with everything it writes to stdout and stderr (structlog JSON,
pynetdicom's and other libraries' stdlib logging, Python warnings) captured in one file. Studies
of one patient go through receive, processing, SR/SEG encoding and delivery to a real Orthanc,
another is rejected (mixed geometry), and one has a malformed birth date that makes pydicom warn;
then the whole output is searched for the patient's name, ID and birth date in several spellings.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from reader.jobs import JobStore, SeriesStatus
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import Orthanc, require_tool, wait_until
from tests.reliability import (
    pacs_results,
    serve_config,
    store_responses,
    write_fixture_model,
    write_study,
)

pytestmark = pytest.mark.integration

FAMILY, GIVEN = "Qwertzuiop", "Asdfghjkl"
PATIENT_NAME = f"{FAMILY}^{GIVEN}"
PATIENT_ID = "PID-7C1E-93X"
BIRTH_DATE = "19420317"
DEADLINE_S = 120.0


def _judged(data_dir: Path, series_uid: str) -> bool:
    state = JobStore(Spool(data_dir)).series_state(series_uid)
    return state is not None and state.status is not SeriesStatus.QUEUED


def _run(tmp_path: Path, orthanc: Orthanc, *, birth_date: str) -> str:
    """Send a valid and a mixed-geometry study of the patient; return the node's whole output."""
    require_tool("storescu")
    model = write_fixture_model(tmp_path / "model")
    node = ReaderNode(tmp_path / "node", config_text=serve_config(model), log_level="debug",
                        destinations=[f"{orthanc.aet}@{orthanc.host}:{orthanc.dicom_port}"])
    try:
        good = write_study(tmp_path / "good", patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                           birth_date=birth_date)
        mixed = write_study(tmp_path / "mixed", patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                            birth_date=birth_date)
        tilted = pydicom.dcmread(mixed.files[10])
        tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
        tilted.save_as(mixed.files[10], enforce_file_format=True)
        for study in (good, mixed):
            answers = store_responses(node.host, node.port, node.ae_title, study.files)
            assert answers == ["Success"] * len(study.files), answers
        for study in (good, mixed):
            wait_until(lambda study=study: _judged(node.data_dir, study.series_uid),  # type: ignore[misc]
                       DEADLINE_S, "every study processed or rejected")
        state = JobStore(Spool(node.data_dir)).series_state(good.series_uid)
        assert state is not None and state.status is SeriesStatus.DONE, state
        wait_until(lambda: {("SR", 1), ("SEG", 1)} <= {
            (r.modality, r.version) for r in pacs_results(orthanc, good.study_uid, good.series_uid)},
                   DEADLINE_S, "the SR and SEG of the valid study in the PACS")
        assert node.events("series.rejected"), "the mixed-geometry series was not rejected"
    finally:
        assert node.stop() == 0, node.log_tail()
    output = node.log_path.read_text(encoding="utf-8", errors="replace")
    assert '"event": "result.sent"' in output and '"level": "debug"' in output
    return output


def _assert_no_identity(output: str) -> None:
    forbidden = [FAMILY, GIVEN, PATIENT_ID, BIRTH_DATE, "1942-03-17", "1942/03/17", "17.03.1942"]
    for needle in forbidden:
        for variant in {needle, needle.lower(), needle.upper()}:
            assert variant not in output, f"patient identity {variant!r} appears in the node's output"


def test_no_patient_name_id_or_birth_date_in_any_output(tmp_path: Path, orthanc: Orthanc) -> None:
    """Processing, rejecting and delivering studies of a named patient writes none of the
    patient's name, ID or birth date (in any common spelling) to the node's stdout or stderr."""
    _assert_no_identity(_run(tmp_path, orthanc, birth_date=BIRTH_DATE))


def test_malformed_birth_date_is_neither_fatal_nor_logged(tmp_path: Path, orthanc: Orthanc) -> None:
    """A birth date that is not a DA value (pydicom warns, quoting it) still gives an SR and SEG,
    and the value appears nowhere in the node's output."""
    _assert_no_identity(_run(tmp_path, orthanc, birth_date="1942-03-17"))
