"""StoreSCU against real peers (Orthanc, pynetdicom SCPs, raw TCP listeners) and the status tables."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, evt
from structlog.testing import capture_logs

from reader import dimse
from reader.config import SendingConfig
from reader.dimse import StatusCategory
from reader.dispatch import DicomDelivery, Dispatcher
from reader.errors import PermanentSendError, StorageError, TransientSendError
from reader.jobs import JobStore, SendState
from reader.send import Destination, StoreSCU
from reader.spool import Spool
from tests.peers import LOCALHOST, Orthanc, OrthancFactory, orthanc, orthanc_factory, require_data

__all__ = ["orthanc", "orthanc_factory"]  # fixtures used below; re-exported so ruff keeps the import

CT_SERIES = "lung-pet-ct-dx/ct-A0001-5mm-lung-kernel"


def _scu() -> StoreSCU:
    """A StoreSCU with short timeouts, so a failing test fails in seconds."""
    return StoreSCU(
        "READER",
        acse_timeout=timedelta(seconds=2),
        dimse_timeout=timedelta(seconds=2),
        network_timeout=timedelta(seconds=5),
    )


def _ct_slices(count: int | None = None) -> list[Path]:
    return sorted(require_data(CT_SERIES).glob("*.dcm"))[:count]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@contextmanager
def _pynetdicom_scp(
    handler: Callable[[evt.Event], int], ae_title: str = "STATUSSCP"
) -> Iterator[Destination]:
    """A real pynetdicom Storage SCP for CT (Implicit VR LE) answering each C-STORE with ``handler``."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(CTImageStorage, ImplicitVRLittleEndian)
    server = ae.start_server((LOCALHOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
    assert server is not None
    try:
        yield Destination(ae_title, LOCALHOST, server.server_address[1])
    finally:
        server.shutdown()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed the connection early")
        data += chunk
    return data


@contextmanager
def _rejecting_peer(result: int, source: int, reason: int) -> Iterator[Destination]:
    """A TCP peer that answers one A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    listener = socket.create_server((LOCALHOST, 0))
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            header = _recv_exact(conn, 6)
            _recv_exact(conn, int.from_bytes(header[2:6], "big"))
            # A real peer answers after a network round trip. Answering within microseconds races
            # pynetdicom's requestor: its DUL can close the transport on the A-ASSOCIATE-RJ before the
            # requestor thread checks that the connection is up, and the rejection reads as an abort.
            threading.Event().wait(0.05)
            conn.sendall(bytes([0x03, 0x00]) + (4).to_bytes(4, "big") + bytes([0x00, result, source, reason]))
            conn.recv(1)  # until the requestor closes the connection

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Destination("REJECTER", LOCALHOST, listener.getsockname()[1])
    finally:
        thread.join(timeout=10)
        listener.close()


# --- Destination --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PACS@pacs.example.org:104", Destination("PACS", "pacs.example.org", 104)),
        ("ORTHANC@127.0.0.1:4242", Destination("ORTHANC", "127.0.0.1", 4242)),
        ("A@B@10.0.0.1:11112", Destination("A@B", "10.0.0.1", 11112)),
        ("PACS@[::1]:65535", Destination("PACS", "::1", 65535)),
        (" PACS @host:1", Destination("PACS", "host", 1)),
        ("SIXTEEN_CHARS_AE@h:2", Destination("SIXTEEN_CHARS_AE", "h", 2)),
    ],
)
def test_destination_parse_accepts_ae_at_host_port(text: str, expected: Destination) -> None:
    """Destination.parse reads AE@HOST:PORT, trimming AE padding and IPv6 brackets."""
    assert Destination.parse(text) == expected
    assert Destination.parse(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "AE@HOST:PORT"),
        ("PACS", "AE@HOST:PORT"),
        ("PACS@host", "AE@HOST:PORT"),
        ("@host:104", "1 to 16"),
        ("   @host:104", "1 to 16"),
        ("SEVENTEEN_CHARS_A@host:104", "1 to 16"),
        ("PA\\CS@host:104", "forbidden"),
        ("PA\tCS@host:104", "forbidden"),
        ("PACS@:104", "host"),
        ("PACS@ho st:104", "host"),
        ("PACS@host:0", "port"),
        ("PACS@host:65536", "port"),
        ("PACS@host:-1", "port"),
        ("PACS@host:abc", "port"),
    ],
)
def test_destination_parse_rejects_invalid_text(text: str, message: str) -> None:
    """Destination.parse raises ValueError with a message naming the invalid part."""
    with pytest.raises(ValueError, match=message):
        Destination.parse(text)


def test_destination_constructor_validates() -> None:
    """A Destination cannot be built with an invalid AE title or port, even without parse()."""
    with pytest.raises(ValueError, match="port"):
        Destination("PACS", "host", 70000)
    with pytest.raises(ValueError, match="padding"):
        Destination(" PACS", "host", 104)


def test_store_scu_rejects_invalid_settings() -> None:
    """StoreSCU refuses an invalid calling AE, a non-positive timeout and a negative max PDU."""
    with pytest.raises(ValueError, match="calling AE"):
        StoreSCU("")
    with pytest.raises(ValueError, match="acse_timeout"):
        StoreSCU("READER", acse_timeout=timedelta(0))
    with pytest.raises(ValueError, match="max_pdu"):
        StoreSCU("READER", max_pdu=-1)


# --- dimse.classify -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (dimse.SUCCESS, StatusCategory.SUCCESS),
        (dimse.WARNING_COERCION, StatusCategory.WARNING),
        (dimse.WARNING_ELEMENTS_DISCARDED, StatusCategory.WARNING),
        (dimse.WARNING_DATASET_MISMATCH, StatusCategory.WARNING),
        (dimse.WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED, StatusCategory.WARNING),
        (dimse.WARNING_ATTRIBUTE_LIST_ERROR, StatusCategory.WARNING),
        (dimse.WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE, StatusCategory.WARNING),
        (0xB123, StatusCategory.WARNING),
        (dimse.OUT_OF_RESOURCES, StatusCategory.TRANSIENT_FAILURE),
        (0xA7FF, StatusCategory.TRANSIENT_FAILURE),
        (dimse.PROCESSING_FAILURE, StatusCategory.TRANSIENT_FAILURE),
        (dimse.RESOURCE_LIMITATION, StatusCategory.TRANSIENT_FAILURE),
        (dimse.DUPLICATE_INVOCATION, StatusCategory.TRANSIENT_FAILURE),
        (dimse.DATASET_MISMATCH, StatusCategory.PERMANENT_FAILURE),
        (0xA9FF, StatusCategory.PERMANENT_FAILURE),
        (dimse.CANNOT_UNDERSTAND, StatusCategory.PERMANENT_FAILURE),
        (0xC210, StatusCategory.PERMANENT_FAILURE),
        (0xCFFF, StatusCategory.PERMANENT_FAILURE),
        (dimse.SOP_CLASS_NOT_SUPPORTED, StatusCategory.PERMANENT_FAILURE),
        (dimse.REFUSED_NOT_AUTHORIZED, StatusCategory.PERMANENT_FAILURE),
        (dimse.UNRECOGNIZED_OPERATION, StatusCategory.PERMANENT_FAILURE),
        (dimse.MISTYPED_ARGUMENT, StatusCategory.PERMANENT_FAILURE),
        (dimse.DUPLICATE_SOP_INSTANCE, StatusCategory.PERMANENT_FAILURE),
        (dimse.PENDING, StatusCategory.PERMANENT_FAILURE),
        (0x0210 | 0xA800, StatusCategory.PERMANENT_FAILURE),
    ],
)
def test_classify_maps_status_to_category(status: int, category: StatusCategory) -> None:
    """dimse.classify puts each C-STORE status in the category PS3.4 B.2.3 / PS3.7 C imply for retries."""
    assert dimse.classify(status) is category


def test_classify_rejects_values_outside_16_bits() -> None:
    """dimse.classify raises ValueError for a number that cannot be a DIMSE status."""
    with pytest.raises(ValueError, match="16-bit"):
        dimse.classify(0x10000)


def test_describe_names_ranges() -> None:
    """dimse.describe names a status by its range and shows the hex code."""
    assert dimse.describe(0xA702) == "0xA702 (refused: out of resources)"
    assert "cannot understand" in dimse.describe(0xC123)
    assert "unknown" in dimse.describe(0x0999)


# --- StoreSCU against peers ---------------------------------------------------------------------


@pytest.mark.integration
def test_send_stores_every_ct_slice_in_orthanc(orthanc: Orthanc) -> None:
    """One send stores the whole shared CT series in Orthanc and logs PHI-free timing events."""
    slices = _ct_slices()
    expected = [_sop_uid(p) for p in slices]
    destination = Destination(orthanc.aet, orthanc.host, orthanc.dicom_port)
    with capture_logs() as logs:
        report = StoreSCU("READER").send(destination, slices)
    assert report.sent == tuple(expected)
    assert report.warnings == ()
    assert report.destination == destination
    assert report.seconds > 0
    assert orthanc.sop_instance_uids() == set(expected)
    events = {entry["event"]: entry for entry in logs}
    assert events["send.association"]["destination_ae"] == orthanc.aet
    assert "result.sent" not in events  # the dispatcher logs it, once per ticket
    patient = pydicom.dcmread(slices[0], stop_before_pixels=True)
    assert str(patient.PatientID) not in repr(logs)
    assert str(patient.PatientName) not in repr(logs)


@pytest.mark.integration
def test_one_delivered_ticket_logs_result_sent_once(orthanc: Orthanc, tmp_path: Path) -> None:
    """A ticket delivered by the dispatcher is logged as exactly one ``result.sent`` event, carrying
    the ticket's fields (ticket, series, destination, attempt) and the association's (destination
    AE, instances, warnings, seconds)."""
    slices = _ct_slices()[:3]
    destination = Destination(orthanc.aet, orthanc.host, orthanc.dicom_port)
    jobs = JobStore(Spool(tmp_path / "data"))
    scu = StoreSCU("READER")
    dispatcher = Dispatcher(jobs, SendingConfig(), {str(destination): DicomDelivery(scu, destination)}, scu)
    ticket = jobs.add_send("1.2.3", 1, str(destination), slices)
    with capture_logs() as logs:
        done = dispatcher.attempt(ticket)
    assert done.state is SendState.DONE
    sent = [entry for entry in logs if entry["event"] == "result.sent"]
    assert len(sent) == 1, logs
    assert {k: sent[0][k] for k in ("ticket", "series_uid", "destination", "attempt", "destination_ae",
                                    "instances", "warnings")} == {
        "ticket": ticket.name, "series_uid": "1.2.3", "destination": str(destination), "attempt": 1,
        "destination_ae": orthanc.aet, "instances": 3, "warnings": 0}
    assert sent[0]["seconds"] > 0


@pytest.mark.integration
def test_send_to_orthanc_that_does_not_know_our_ae_is_permanent(orthanc_factory: OrthancFactory) -> None:
    """Orthanc rejects an unknown calling AE ("calling AE not recognised"): a PermanentSendError."""
    strict = orthanc_factory(always_allow_store=False, always_allow_echo=False)
    with pytest.raises(PermanentSendError, match="Calling AE title not recognised"):
        _scu().send(Destination(strict.aet, strict.host, strict.dicom_port), _ct_slices(1))
    assert strict.instances() == []


@pytest.mark.integration
def test_send_with_wrong_called_ae_is_permanent(orthanc_factory: OrthancFactory) -> None:
    """Orthanc checking the called AE rejects a wrong one ("called AE not recognised"): permanent."""
    checking = orthanc_factory(check_called_aet=True)
    with pytest.raises(PermanentSendError, match="Called AE title not recognised"):
        _scu().send(Destination("NOTORTHANC", checking.host, checking.dicom_port), _ct_slices(1))


@pytest.mark.integration
def test_send_from_a_declared_modality_is_accepted(orthanc_factory: OrthancFactory) -> None:
    """The same strict Orthanc stores from our AE once it is declared as a modality."""
    strict = orthanc_factory(
        always_allow_store=False, always_allow_echo=False, modalities={"reader": ("READER", LOCALHOST, 1)}
    )
    slices = _ct_slices(2)
    report = _scu().send(Destination(strict.aet, strict.host, strict.dicom_port), slices)
    assert len(report.sent) == 2
    assert len(strict.instances()) == 2


@pytest.mark.integration
def test_orthanc_aborting_an_unauthorised_store_is_transient(orthanc_factory: OrthancFactory) -> None:
    """Orthanc accepting the association but aborting an unauthorised C-STORE yields a TransientSendError.

    An A-ABORT carries no trustworthy reason, so we cannot tell it from a crash; the retry policy
    must bound the attempts.
    """
    echo_only = orthanc_factory(always_allow_store=False, always_allow_echo=True)
    destination = Destination(echo_only.aet, echo_only.host, echo_only.dicom_port)
    with pytest.raises(TransientSendError, match="no C-STORE response"):
        _scu().send(destination, _ct_slices(1))


def test_send_to_closed_port_is_transient() -> None:
    """Connection refused (nothing listening) raises TransientSendError."""
    with socket.create_server((LOCALHOST, 0)) as reserved:
        port = reserved.getsockname()[1]
    with pytest.raises(TransientSendError, match="no association"):
        _scu().send(Destination("NOBODY", LOCALHOST, port), _ct_slices(1))


def test_send_to_silent_peer_times_out_as_transient() -> None:
    """A peer that accepts TCP but never answers the A-ASSOCIATE-RQ raises TransientSendError."""
    with socket.create_server((LOCALHOST, 0)) as silent:
        destination = Destination("SILENT", LOCALHOST, silent.getsockname()[1])
        scu = StoreSCU("READER", acse_timeout=timedelta(seconds=0.5))
        with pytest.raises(TransientSendError):
            scu.send(destination, _ct_slices(1))


@pytest.mark.parametrize(
    ("result", "source", "reason", "error"),
    [
        (1, 1, 3, PermanentSendError),  # calling AE title not recognised
        (1, 1, 7, PermanentSendError),  # called AE title not recognised
        (1, 1, 2, PermanentSendError),  # application context name not supported
        (1, 2, 2, PermanentSendError),  # protocol version not supported
        (1, 1, 1, TransientSendError),  # no reason given
        (2, 1, 1, TransientSendError),  # transient, no reason given
        (2, 3, 1, TransientSendError),  # temporary congestion
        (2, 3, 2, TransientSendError),  # local limit exceeded
    ],
)
def test_association_rejection_is_classified_by_reason(
    result: int, source: int, reason: int, error: type[Exception]
) -> None:
    """An A-ASSOCIATE-RJ is permanent for unrecognised AE titles or protocol, transient otherwise."""
    with _rejecting_peer(result, source, reason) as destination, pytest.raises(error, match="rejected"):
        _scu().send(destination, _ct_slices(1))


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (dimse.OUT_OF_RESOURCES, TransientSendError),
        (0xA7FE, TransientSendError),
        (dimse.PROCESSING_FAILURE, TransientSendError),
        (dimse.DATASET_MISMATCH, PermanentSendError),
        (dimse.CANNOT_UNDERSTAND, PermanentSendError),
        (dimse.SOP_CLASS_NOT_SUPPORTED, PermanentSendError),
        (dimse.REFUSED_NOT_AUTHORIZED, PermanentSendError),
    ],
)
def test_failure_status_raises_typed_error_with_status(status: int, error: type[Exception]) -> None:
    """A failure status from a real SCP raises the error its category implies, carrying the status."""
    with _pynetdicom_scp(lambda event: status) as destination, pytest.raises(error) as raised:
        _scu().send(destination, _ct_slices(2))
    assert isinstance(raised.value, TransientSendError | PermanentSendError)
    assert raised.value.status == status


def test_warning_status_is_stored_and_reported() -> None:
    """Warning statuses count as sent and are listed in SendReport.warnings with their code."""
    slices = _ct_slices(2)
    with _pynetdicom_scp(lambda event: dimse.WARNING_COERCION) as destination:
        report = _scu().send(destination, slices)
    uids = tuple(_sop_uid(p) for p in slices)
    assert report.sent == uids
    assert report.warnings == tuple((uid, dimse.WARNING_COERCION) for uid in uids)


def test_dimse_timeout_is_transient() -> None:
    """An SCP that does not answer the C-STORE within the DIMSE timeout raises TransientSendError."""
    release = threading.Event()

    def stall(event: evt.Event) -> int:
        release.wait(timeout=10)
        return dimse.SUCCESS

    scu = StoreSCU("READER", dimse_timeout=timedelta(seconds=0.5), acse_timeout=timedelta(seconds=2))
    try:
        with _pynetdicom_scp(stall) as destination, pytest.raises(TransientSendError, match="no C-STORE"):
            scu.send(destination, _ct_slices(1))
    finally:
        release.set()


def test_unsupported_sop_class_sends_nothing(tmp_path: Path) -> None:
    """A file whose SOP class the peer refuses raises PermanentSendError before any file is sent."""
    ct = _ct_slices(1)[0]
    ds = pydicom.dcmread(ct)
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr)
    received: list[evt.Event] = []

    def store(event: evt.Event) -> int:
        received.append(event)
        return dimse.SUCCESS

    with _pynetdicom_scp(store) as destination, pytest.raises(PermanentSendError) as raised:
        _scu().send(destination, [ct, mr])
    assert raised.value.status == dimse.SOP_CLASS_NOT_SUPPORTED
    assert received == []


def test_no_accepted_context_is_permanent(tmp_path: Path) -> None:
    """A peer that accepts none of the proposed presentation contexts raises PermanentSendError."""
    ds = pydicom.dcmread(_ct_slices(1)[0])
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr)
    with _pynetdicom_scp(lambda event: dimse.SUCCESS) as destination, pytest.raises(PermanentSendError):
        _scu().send(destination, [mr])


def test_unreadable_inputs_raise_before_connecting(tmp_path: Path) -> None:
    """A missing file is a StorageError and a non-DICOM file a PermanentSendError, with no association."""
    nowhere = Destination("NOBODY", LOCALHOST, 1)
    with pytest.raises(StorageError):
        StoreSCU("READER").send(nowhere, [tmp_path / "missing.dcm"])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom" * 100)
    with pytest.raises(PermanentSendError, match="not a DICOM file"):
        StoreSCU("READER").send(nowhere, [junk])


def test_empty_batch_sends_nothing() -> None:
    """Sending no files returns an empty report without opening an association."""
    report = StoreSCU("READER").send(Destination("NOBODY", LOCALHOST, 1), [])
    assert report.sent == ()
    assert report.warnings == ()
