"""The real-peer harness: Orthanc on ephemeral ports, DCMTK echoscu/storescu, dciodvfy, polling helpers."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
import pytest

from tests.peers import (
    LOCALHOST,
    Orthanc,
    dciodvfy,
    echoscu,
    free_port,
    orthanc,
    orthanc_factory,
    require_data,
    require_tool,
    storescu,
    wait_until,
)

__all__ = ["orthanc", "orthanc_factory"]  # fixtures used below; re-exported so ruff keeps the import

CT_SERIES = "lung-pet-ct-dx/ct-A0001-5mm-lung-kernel"


def _ct_slices(count: int) -> list[Path]:
    return sorted(require_data(CT_SERIES).glob("*.dcm"))[:count]


def _refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOCALHOST, port)) != 0


def test_wait_until_names_what_it_waited_for() -> None:
    """wait_until raises an AssertionError naming the awaited condition when the deadline passes."""
    with pytest.raises(AssertionError, match="the moon to turn blue"):
        wait_until(lambda: False, 0.1, "the moon to turn blue")


def test_free_port_is_bindable_on_loopback() -> None:
    """free_port returns a port that can be bound on 127.0.0.1 right away."""
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOCALHOST, port))
    assert 1024 <= port <= 65535


def test_require_tool_missing_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing program skips the test outside CI and fails it under CI=true, naming its package."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="dicom3tools"):
        require_tool("dciodvfy")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="dicom3tools"):
        require_tool("dciodvfy")


@pytest.mark.integration
def test_orthanc_starts_on_ephemeral_ports_and_stops(orthanc: Orthanc) -> None:
    """Orthanc answers REST on its own ephemeral ports with our AE title, and stop() closes them."""
    system = orthanc.rest_get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert system["HttpPort"] == orthanc.http_port
    assert {orthanc.dicom_port, orthanc.http_port}.isdisjoint({104, 4242, 8042, 11112})
    orthanc.stop()
    assert orthanc.process.poll() is not None
    wait_until(lambda: _refuses_connections(orthanc.dicom_port), 5.0, "Orthanc's DICOM port to close")


@pytest.mark.integration
def test_echoscu_to_orthanc_succeeds(orthanc: Orthanc) -> None:
    """A C-ECHO from DCMTK echoscu to Orthanc completes with exit status 0."""
    done = echoscu(orthanc.host, orthanc.dicom_port, orthanc.aet)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_storescu_three_ct_slices_arrive_in_orthanc(orthanc: Orthanc) -> None:
    """Three CT slices sent with DCMTK storescu are stored by Orthanc with their SOP Instance UIDs."""
    slices = _ct_slices(3)
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in slices}
    done = storescu(orthanc.host, orthanc.dicom_port, orthanc.aet, slices)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: len(orthanc.instances()) == 3, 10.0, "3 instances in Orthanc")
    assert orthanc.sop_instance_uids() == expected
    assert len(orthanc.studies()) == 1


@pytest.mark.integration
def test_orthanc_round_trips_an_upload(orthanc: Orthanc) -> None:
    """A file uploaded through REST downloads again with the same SOP Instance UID."""
    path = _ct_slices(1)[0]
    instance_id = orthanc.upload(path)
    assert orthanc.instances() == [instance_id]
    downloaded = orthanc.download(instance_id)
    assert downloaded[128:132] == b"DICM"
    assert str(pydicom.dcmread(path).SOPInstanceUID) in orthanc.sop_instance_uids()


@pytest.mark.integration
def test_dciodvfy_reports_a_missing_type1_attribute(tmp_path: Path) -> None:
    """dciodvfy returns an error line for a Type 1 attribute (Image Type) removed from a CT slice."""
    original = _ct_slices(1)[0]
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(original)
    del ds.ImageType
    ds.save_as(broken)
    assert not any("ImageType" in line for line in dciodvfy(original))
    errors = dciodvfy(broken)
    assert any("ImageType" in line for line in errors), errors
    assert all("Error" in line for line in errors)
