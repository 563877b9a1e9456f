"""STOW-RS in (reader.web.stow): studies POSTed over HTTP to a real ``reader serve`` process.

The node has one web caller (a bearer token read from a file) and a fast fixture model
(tests/reliability.py). A synthetic CT series (tests/dicom_factory.py) is posted with
dicomweb-client, a real DICOMweb client, and must be stored and read as if C-STOREd; malformed
requests, built here part by part, must be refused whole with nothing stored.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from reader.jobs import JobStore, SeriesStatus
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import wait_until
from tests.reliability import Study, serve_config, write_fixture_model, write_study

pytestmark = pytest.mark.integration

TOKEN = "stow-test-token-0123456789abcdef"
TIMEOUT_S = 60.0
# Well under the configured idle timeout (60 s): a study completes because the request ended.
COMPLETE_S = 40.0
BOUNDARY = "reader-test-boundary-7f3a"
RELATED = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
MISMATCH = 0xA900


@dataclass
class StowNode:
    """The running node and where it keeps received instances."""

    node: ReaderNode
    incoming: Path

    @property
    def url(self) -> str:
        """The DICOMweb root of the node."""
        return f"{self.node.web_url}/dicom-web"

    def post(self, path: str, body: bytes, *, content_type: str = RELATED,
             authorization: str | None = f"Bearer {TOKEN}") -> httpx.Response:
        """POST ``body`` to ``/dicom-web{path}``."""
        headers = {"Content-Type": content_type}
        if authorization is not None:
            headers["Authorization"] = authorization
        return httpx.post(self.url + path, content=body, headers=headers, timeout=TIMEOUT_S)

    def stored(self, study_uid: str) -> list[Path]:
        """The instance files the node holds for a study."""
        return sorted((self.incoming / study_uid).glob("*/*.dcm"))


@pytest.fixture(scope="module")
def stow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StowNode]:
    """A node admitting one web caller ("PACS") by its token, with the fast fixture model."""
    root = tmp_path_factory.mktemp("stow")
    model = write_fixture_model(root / "model")
    token_file = root / "pacs.token"
    token_file.write_text(TOKEN + "\n")
    config = serve_config(model) + f'\n[[security.web_callers]]\nname = "PACS"\ntoken_file = "{token_file}"\n'
    node = ReaderNode(root / "node", config_text=config)
    yield StowNode(node, node.data_dir / "incoming")
    node.stop()


def related(parts: list[tuple[str, bytes]], *, close: bool = True) -> bytes:
    """A multipart/related body of ``(content type, bytes)`` parts (``close``: the final boundary)."""
    mark = b"--" + BOUNDARY.encode()
    body = b"".join(mark + b"\r\nContent-Type: " + kind.encode() + b"\r\n\r\n" + data + b"\r\n"
                    for kind, data in parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def dicom_parts(study: Study, count: int | None = None) -> list[tuple[str, bytes]]:
    """The study's Part 10 files as application/dicom parts."""
    return [("application/dicom", f.read_bytes()) for f in study.files[:count]]


def sop_uid(path: Path) -> str:
    """The SOP Instance UID of a Part 10 file."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def response(answer: httpx.Response) -> Dataset:
    """The Store Instances Response dataset of an answer (application/dicom+json)."""
    assert answer.headers["content-type"] == "application/dicom+json", answer.text
    return Dataset.from_json(answer.json())


def test_a_series_posted_with_dicomweb_client_is_stored_and_read(stow: StowNode, tmp_path: Path) -> None:
    """A CT series posted by dicomweb-client is answered 200 with every instance in the Referenced
    SOP Sequence, stored as received, and read by the model once the request has ended (well
    before the idle timeout), leaving an SR and a SEG in the data dir."""
    study = write_study(tmp_path / "study", n_slices=20)
    datasets = [pydicom.dcmread(f) for f in study.files]
    client = DICOMwebClient(stow.url, headers={"Authorization": f"Bearer {TOKEN}"})
    answer = client.store_instances(datasets)
    assert "FailedSOPSequence" not in answer
    items = answer.ReferencedSOPSequence
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in items) == list(study.sop_uids)
    assert str(answer.RetrieveURL) == f"{stow.url}/studies/{study.study_uid}"
    series_url = f"{stow.url}/studies/{study.study_uid}/series/{study.series_uid}"
    assert all(str(i.RetrieveURL) == f"{series_url}/instances/{i.ReferencedSOPInstanceUID}" for i in items)
    stored = stow.stored(study.study_uid)
    assert [p.stem for p in stored] == list(study.sop_uids)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for path in stored:
        assert pydicom.dcmread(path).PixelData == by_uid[path.stem].PixelData

    jobs = JobStore(Spool(stow.node.data_dir))

    def read() -> bool:
        state = jobs.series_state(study.series_uid)
        if state is not None and state.status in (SeriesStatus.FAILED, SeriesStatus.SKIPPED):
            raise AssertionError(f"series {state.status}: {state.reason}")
        return state is not None and state.status is SeriesStatus.DONE
    wait_until(read, COMPLETE_S, "the posted series read by the model")
    results = stow.node.data_dir / "results" / study.series_uid
    assert {p.name for p in results.glob("v*/*.dcm")} >= {"sr.dcm", "seg.dcm"}
    events = [e for e in stow.node.events("stow.received") if e["stored"] == 20]
    assert events and events[-1]["caller"] == "PACS" and events[-1]["failed"] == 0


def test_instances_of_another_study_than_the_urls_fail_with_a900(stow: StowNode, tmp_path: Path) -> None:
    """Posted to /studies/{A}, an instance of study A is stored and one of study B is answered in
    the Failed SOP Sequence with reason 0xA900 (202); only B's instances: 409, none stored."""
    a = write_study(tmp_path / "a", n_slices=2)
    b = write_study(tmp_path / "b", n_slices=2)
    answer = stow.post(f"/studies/{a.study_uid}", related(dicom_parts(a, 1) + dicom_parts(b, 1)))
    assert answer.status_code == 202, answer.text
    result = response(answer)
    assert [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence] == [sop_uid(a.files[0])]
    (failed,) = result.FailedSOPSequence
    assert (str(failed.ReferencedSOPInstanceUID), failed.FailureReason) == (sop_uid(b.files[0]), MISMATCH)
    assert str(failed.ReferencedSOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"
    assert [p.stem for p in stow.stored(a.study_uid)] == [sop_uid(a.files[0])]
    assert stow.stored(b.study_uid) == []

    only_b = stow.post(f"/studies/{a.study_uid}", related(dicom_parts(b)))
    assert only_b.status_code == 409, only_b.text
    assert [f.FailureReason for f in response(only_b).FailedSOPSequence] == [MISMATCH, MISMATCH]
    assert stow.stored(b.study_uid) == []


@pytest.mark.parametrize("damage", ["no closing boundary", "no boundary at all", "no parts"])
def test_invalid_multipart_is_400_and_stores_nothing(stow: StowNode, tmp_path: Path, damage: str) -> None:
    """A body that is not valid multipart/related is refused whole with 400 and its reason; none
    of the DICOM parts it holds is stored."""
    study = write_study(tmp_path / "s", n_slices=3)
    body = {
        "no closing boundary": related(dicom_parts(study), close=False),
        "no boundary at all": b"".join(f.read_bytes() for f in study.files),
        "no parts": b"--" + BOUNDARY.encode() + b"--\r\n",
    }[damage]
    answer = stow.post("/studies", body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] and "Traceback" not in answer.text
    assert stow.stored(study.study_uid) == []


def test_a_non_dicom_part_is_400_and_stores_nothing(stow: StowNode, tmp_path: Path) -> None:
    """A part that is not a DICOM Part 10 file, or not application/dicom, refuses the whole request
    (400 naming the part); the valid DICOM parts before it are not stored."""
    study = write_study(tmp_path / "s", n_slices=3)
    bad_part = ("application/dicom", b"hello, not DICOM")
    not_dicom = stow.post("/studies", related([*dicom_parts(study), bad_part]))
    assert not_dicom.status_code == 400
    assert "part 4 is not a DICOM Part 10 file" in not_dicom.json()["error"]
    text = stow.post("/studies", related([*dicom_parts(study, 1), ("text/plain", b"hello")]))
    assert text.status_code == 400 and "part 2 is text/plain" in text.json()["error"]
    assert stow.stored(study.study_uid) == []


def test_a_wrong_or_missing_token_is_401(stow: StowNode, tmp_path: Path) -> None:
    """Without the configured bearer token the caller gets 401 with a Bearer challenge, and
    nothing is stored."""
    study = write_study(tmp_path / "s", n_slices=2)
    body = related(dicom_parts(study))
    for authorization in ("Bearer wrong-token-0123456789abcdef", None, f"Basic {TOKEN}", TOKEN):
        answer = stow.post("/studies", body, authorization=authorization)
        assert answer.status_code == 401, authorization
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert stow.stored(study.study_uid) == []
    assert stow.node.events("stow.refused")[-1]["reason"] == "unauthorized"


def test_other_media_types_are_415(stow: StowNode, tmp_path: Path) -> None:
    """A body that is not multipart/related of application/dicom (a bare Part 10 file, or
    type="application/dicom+json") is answered 415."""
    study = write_study(tmp_path / "s", n_slices=1)
    data = study.files[0].read_bytes()
    assert stow.post("/studies", data, content_type="application/dicom").status_code == 415
    json_type = RELATED.replace("application/dicom", "application/dicom+json")
    assert stow.post("/studies", related(dicom_parts(study)), content_type=json_type).status_code == 415
    assert stow.stored(study.study_uid) == []


def test_the_response_dataset_round_trips_through_pydicom(stow: StowNode, tmp_path: Path) -> None:
    """The 200 answer's dataset is valid DICOM JSON that pydicom reads and writes back as Part 10."""
    study = write_study(tmp_path / "s", n_slices=1)
    answer = stow.post(f"/studies/{study.study_uid}", related(dicom_parts(study)))
    assert answer.status_code == 200, answer.text
    result = response(answer)
    buffer = io.BytesIO()
    result.save_as(buffer, implicit_vr=False, little_endian=True)
    assert buffer.getvalue()
