"""The node's audit trail: what happened, to whose data, recorded as DICOM audit messages.

:class:`AuditTrail` turns the node's events into the messages of ``reader.audit.messages`` and
queues them in memory; its writer thread makes them durable in batches: a line each in the local
audit file (``<data_dir>/audit/audit.log`` unless configured, fsynced once a batch) and a file each
in the outbox of every configured collector (written atomically), which a sender thread per
collector (``reader.audit.syslog``) delivers in order. Callers (the association threads among
them) only build the XML and enqueue it: they never wait on a disk or a network, so a collector
that is down never slows the C-STORE path or the sends. What a crash can lose: the messages of
the last few milliseconds not yet written, and the receipts of associations still open (they
are reported when an association ends).

These messages name patients (ATNA requires it), so they go to the audit file and the collectors
only, never to the ordinary structlog log, whose audit events (``audit.collector_down``...) carry
no identity. Receipts are audited once per study and association, when the association ends
(:meth:`AuditTrail.instance_received` only counts, in memory).
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import os
import queue
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import structlog
from pydicom.errors import InvalidDicomError

from reader.audit import messages as m
from reader.audit.syslog import CollectorSender, format_message
from reader.config import AuditCollector, AuditConfig

__all__ = ["AuditTrail"]

log = structlog.get_logger(__name__)

_DRAIN_ON_STOP_S = 3.0
_APP_NAME = "reader"
_BATCH = 1000  # messages written (and fsynced) together at most


@dataclass
class _StudyTally:
    """What one association delivered of one study (in memory until the association ends)."""

    patient: m.PatientObject
    accession_numbers: set[str] = field(default_factory=set)
    sop_classes: Counter[str] = field(default_factory=Counter)


@dataclass
class _Receipt:
    calling_ae: str
    address: str
    studies: dict[str, _StudyTally] = field(default_factory=dict)


def _text(value: Any) -> str:
    return str(value).strip() if value is not None else ""


def _patient(header: Any) -> m.PatientObject:
    return m.PatientObject(_text(header.get("PatientID")), _text(header.get("PatientName")))


def _outbox_name(collector: AuditCollector) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in collector.key)


class AuditTrail:
    """Records audit messages; :meth:`start` and :meth:`stop` run the collectors' senders."""

    def __init__(self, config: AuditConfig, data_dir: Path, ae_title: str, process: str = "") -> None:
        """``process``: a cluster process's name (``reader.node``): its audit file, outboxes and
        staged writes go to ``audit/<process>/``, since every process of a cluster shares the data
        dir and each writes and delivers its own messages."""
        self.config = config
        self.root = data_dir / "audit" / process if process else data_dir / "audit"
        self.file = config.file or self.root / "audit.log"
        self._outbox = self.root / "outbox"
        self._tmp = self.root / "tmp"
        self.ae_title = ae_title
        self.hostname = socket.gethostname()
        self.source = m.AuditSource(config.source_id or ae_title, config.enterprise_site)
        self.node = m.Participant(config.source_id or ae_title, False, ae_titles=(ae_title,),
                                  address=self.hostname)
        self._lock = threading.Lock()  # the receipts of open associations
        self._write_lock = threading.Lock()  # the audit file and the outboxes
        self._sequence = itertools.count()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._receipts: dict[int, _Receipt] = {}
        self.senders = [CollectorSender(c.host, c.port, self._outbox / _outbox_name(c), tls=c.tls,
                                        retry_max=config.retry_max, listing_lock=self._write_lock)
                        for c in config.collectors]

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Create the folders, remove interrupted writes, start the writer and one sender per
        collector (messages still waiting from an earlier run go first)."""
        for folder in (self.root, self._tmp, self.file.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():  # halves of writes a crash interrupted (never renamed)
            leftover.unlink(missing_ok=True)
        for sender in self.senders:
            sender.start()
        self._writer = threading.Thread(target=self._write_loop, name="reader-audit-writer", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Write every queued message, give the senders a moment to deliver what waits, then stop
        them (the rest stays in the outboxes for the next start)."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        for sender in self.senders:
            sender.stop(drain=_DRAIN_ON_STOP_S)

    # --- recording --------------------------------------------------------------------------
    def record(self, xml: bytes, *, failure: bool = False) -> None:
        """Queue one audit message (stamped now) for the file and every collector; returns at once.
        Before :meth:`start` or after :meth:`stop` it is written at once instead."""
        line = format_message(xml, hostname=self.hostname, app_name=_APP_NAME, failure=failure)
        if self._writer is not None:
            self._queue.put(line)
        else:
            self._write([line])

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            batch = [] if first is None else [first]
            stop = first is None
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._write(batch)
            if stop:
                return

    def _write(self, lines: list[bytes]) -> None:
        """Append ``lines`` to the audit file and put a file each in every outbox, all durably, in
        order. A disk failure is logged (``audit.write_failed``), never raised: auditing does not
        stop the work audited."""
        try:
            with self._write_lock:
                fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, b"".join(line + b"\n" for line in lines))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                names = [f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):09d}.msg" for _ in lines]
                for sender in self.senders:
                    _write_files(sender.outbox, self._tmp, zip(names, lines, strict=True))
        except OSError as exc:
            log.error("audit.write_failed", detail=str(exc), messages=len(lines))
            return
        for sender in self.senders:
            sender.wake()

    # --- the node's events ------------------------------------------------------------------
    def application_started(self) -> None:
        """A.5.3.1 Application Start, launched by the operating-system user running the node."""
        self.record(m.application_activity(self.source, self.node, started=True, launcher=self._launcher()))

    def application_stopped(self) -> None:
        """A.5.3.1 Application Stop."""
        self.record(m.application_activity(self.source, self.node, started=False, launcher=self._launcher()))

    def _launcher(self) -> m.Participant:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for the uid (containers)
            user = str(os.getuid())
        return m.Participant(user, True)

    def association_accepted(self, calling_ae: str, address: str) -> None:
        """A.5.3.11 Security Alert, Node Authentication success: ``calling_ae`` at ``address`` admitted."""
        peer = m.Participant(calling_ae, True, ae_titles=(calling_ae,), address=address)
        self.record(m.node_authentication(self.source, self.node, peer, accepted=True))

    def association_rejected(self, calling_ae: str, address: str, reason: str) -> None:
        """A.5.3.11 Security Alert, Node Authentication failure, with the allow-list's reason."""
        peer = m.Participant(calling_ae or "UNKNOWN", True, ae_titles=(calling_ae,) if calling_ae else (),
                             address=address)
        self.record(m.node_authentication(self.source, self.node, peer, accepted=False, reason=reason),
                    failure=True)

    def instance_received(self, association_id: int, *, calling_ae: str, address: str, study_uid: str,
                          sop_class_uid: str, header: Any) -> None:
        """Count one instance stored from an association (memory only; audited when it ends).
        ``header`` is the dataset: its Patient ID, Patient's Name and Accession Number are read."""
        try:
            patient, accession = _patient(header), _text(header.get("AccessionNumber"))
        except Exception as exc:  # noqa: BLE001 - a header pydicom cannot decode must not fail a stored instance
            log.warning("audit.header_unreadable", error=type(exc).__name__)
            patient, accession = m.PatientObject(""), ""
        with self._lock:
            receipt = self._receipts.setdefault(association_id, _Receipt(calling_ae, address))
            tally = receipt.studies.setdefault(study_uid, _StudyTally(patient))
            if accession:
                tally.accession_numbers.add(accession)
            tally.sop_classes[sop_class_uid] += 1

    def association_ended(self, association_id: int) -> None:
        """A.5.3.5 DICOM Instances Transferred (action C), one per study the association delivered;
        nothing when it delivered nothing (or was already reported)."""
        with self._lock:
            receipt = self._receipts.pop(association_id, None)
        if receipt is None:
            return
        sender = m.Participant(receipt.calling_ae, True, ae_titles=(receipt.calling_ae,),
                               address=receipt.address)
        for study_uid, tally in receipt.studies.items():
            study = m.StudyObject(study_uid, dict(tally.sop_classes), tuple(sorted(tally.accession_numbers)))
            self.record(m.instances_transferred(self.source, sender, self.node, [study], tally.patient,
                                                received=True))

    def results_sent(self, destination: str, files: Sequence[Path]) -> None:
        """A.5.3.5 DICOM Instances Transferred (action R): result objects delivered to
        ``destination`` (a send ticket's key: ``AE@HOST:PORT`` or ``stow:URL``); one message per
        patient, each study with its SOP classes, read from the files' headers."""
        receiver = _destination(destination)
        by_patient: dict[m.PatientObject, dict[str, _StudyTally]] = {}
        for path in files:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["StudyInstanceUID", "SOPClassUID", "PatientID",
                                                        "PatientName", "AccessionNumber"])
            except (OSError, InvalidDicomError) as exc:  # sent, then gone: audit the others
                log.error("audit.result_unreadable", file=path.name, detail=str(exc))
                continue
            patient = _patient(header)
            studies = by_patient.setdefault(patient, {})
            study_uid = _text(header.get("StudyInstanceUID"))
            tally = studies.setdefault(study_uid, _StudyTally(patient))
            accession = _text(header.get("AccessionNumber"))
            if accession:
                tally.accession_numbers.add(accession)
            tally.sop_classes[_text(header.get("SOPClassUID"))] += 1
        for patient, studies in by_patient.items():
            objects = [m.StudyObject(uid, dict(t.sop_classes), tuple(sorted(t.accession_numbers)))
                       for uid, t in studies.items()]
            self.record(m.instances_transferred(self.source, self.node, receiver, objects, patient,
                                                received=False))

    # --- for retention, the command line and the web pages (wired by them) --------------------
    def study_deleted(self, study_uid: str, patient: m.PatientObject, *, user: str | None = None,
                      address: str | None = None) -> None:
        """A.5.3.6 DICOM Study Deleted: ``study_uid`` of ``patient`` removed by ``user`` (from
        ``address``), or by the node itself (retention) when no user is given."""
        deleter = (m.Participant(user, True, address=address) if user is not None
                   else m.Participant(self.node.user_id, True, ae_titles=self.node.ae_titles,
                                      address=self.node.address))
        self.record(m.study_deleted(self.source, deleter, [m.StudyObject(study_uid)], patient))

    def user_signed_in(self, user: str, address: str, success: bool, detail: str = "") -> None:
        """A.5.3.12 User Authentication, Login: ``user`` from ``address``; a refused sign-in is
        outcome 4 (minor failure) with ``detail`` (never the password tried)."""
        person = m.Participant(user or "UNKNOWN", True, address=address)
        self.record(m.user_authentication(self.source, person, self.node, success=success,
                                          description=detail), failure=not success)

    def send_retried(self, user: str, address: str, *, ticket: str, destination: str,
                     study_uid: str | None = None, patient: m.PatientObject | None = None) -> None:
        """A.5.3.11 Security Alert, Use of Restricted Function: ``user`` re-queued the parked send
        ``ticket`` to ``destination``."""
        self._manual(user, address, ticket, f"send retried to {destination}", study_uid=study_uid,
                     patient=patient)

    def send_cancelled(self, user: str, address: str, *, ticket: str, destination: str,
                       study_uid: str | None = None, patient: m.PatientObject | None = None) -> None:
        """A.5.3.11 Security Alert, Use of Restricted Function: ``user`` cancelled the send
        ``ticket`` to ``destination``."""
        self._manual(user, address, ticket, f"send cancelled to {destination}", study_uid=study_uid,
                     patient=patient)

    def _manual(self, user: str, address: str, ticket: str, description: str, *, study_uid: str | None,
                patient: m.PatientObject | None) -> None:
        person = m.Participant(user or "UNKNOWN", True, address=address)
        studies: Iterable[m.StudyObject] = (m.StudyObject(study_uid),) if study_uid else ()
        self.record(m.restricted_function(self.source, person, self.node, subject=f"reader:send/{ticket}",
                                          description=description, studies=tuple(studies), patient=patient))


def _write_files(folder: Path, tmp_dir: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """Write each (name, data) into ``folder`` atomically (temporary file, fsync, rename), then
    make the new names durable with one fsync of the folder."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in files:
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".w-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _destination(key: str) -> m.Participant:
    """The receiving participant named by a send ticket's key."""
    if key.startswith("stow:"):
        url = key.removeprefix("stow:")
        return m.Participant(url, False, address=urlsplit(url).hostname)
    ae_title, _, rest = key.partition("@")
    host = rest.rpartition(":")[0] if rest else None
    return m.Participant(ae_title, False, ae_titles=(ae_title,), address=host or None)
