"""Retrospective reads (``reader backfill``, reader.backfill, reader.queryretrieve, reader.holds).

Real peers: Orthanc is the source PACS (C-FIND and C-MOVE SCP) and knows the node's AE title as a
move destination; the node is a ``reader serve`` subprocess with the fast fixture model
(tests/reliability.py); the backfill runs as ``python -m reader.cli backfill``, as an operator runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest

from reader.backfill import Window
from reader.config import load_config
from reader.errors import ConfigError
from reader.jobs import JobStore, SeriesStatus
from reader.qido import DicomWebSource
from reader.queryretrieve import StudyQuery
from reader.spool import Spool
from tests.node_process import ReaderNode
from tests.peers import LOCALHOST, Orthanc, OrthancFactory, free_port, storescu, wait_until
from tests.reliability import Study, serve_config, write_fixture_model, write_study
from tests.viewers import DICOMWEB_ROOT, dicomweb_config

REPO = Path(__file__).resolve().parents[1]
NODE_AE = "SECONDREADER"
READ_S = 120.0
RUN_S = 300.0


# ---------------------------------------------------------------- the window, with an injected clock


def test_window_opens_in_computes_the_wait_across_midnight() -> None:
    """A 22:00-06:00 window is open at 23:30 and at 05:59, closed at 06:00 and at noon; from noon
    the wait is exactly 10 h, from 21:59:30 half a minute; a same-day window 01:00-02:00 seen at
    03:00 opens the next day in 22 h."""
    night = Window.parse("22:00-06:00")
    day = datetime(2026, 3, 1)
    assert night.is_open(day.replace(hour=23, minute=30)) and night.is_open(day.replace(hour=5, minute=59))
    assert not night.is_open(day.replace(hour=6)) and not night.is_open(day.replace(hour=12))
    assert night.opens_in(day.replace(hour=12)) == timedelta(hours=10)
    assert night.opens_in(day.replace(hour=21, minute=59, second=30)) == timedelta(seconds=30)
    assert night.opens_in(day.replace(hour=23)) == timedelta(0)
    assert Window.parse("01:00-02:00").opens_in(day.replace(hour=3)) == timedelta(hours=22)
    for bad in ("22:00", "25:00-06:00", "06:00-06:00"):
        with pytest.raises(ValueError):
            Window.parse(bad)


def test_sources_are_typed_and_checked(tmp_path: Path) -> None:
    """[[sources]] entries become typed sources found by name (case-insensitive), retrieving by
    C-MOVE unless they say "get"; a DICOMweb source (url) retrieves by "get". A missing port, a bad
    AE title, a duplicate name, an unknown retrieve method, a url beside an AE title, a url that is
    not http(s) or "move" with a url is a ConfigError naming the key."""
    base = '[[sources]]\nname = "PACS"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
    path = tmp_path / "reader.toml"
    path.write_text(base)
    source = load_config(path).source("pacs")
    assert (source.name, source.ae_title, source.host, source.port) == ("PACS", "ORTHANC", "127.0.0.1", 4242)
    assert source.retrieve == "move"
    path.write_text('[[sources]]\nname = "WEB"\nurl = "https://pacs.example.org/dicom-web"\n')
    web = load_config(path).source("WEB")
    assert (web.url, web.retrieve) == ("https://pacs.example.org/dicom-web", "get")
    for text, key in ((base.replace("port = 4242\n", ""), r"sources\[0\]\.port"),
                      (base.replace('"ORTHANC"', '"A\\\\B"'), r"sources\[0\]\.ae_title"),
                      (base + base, r"sources\[1\]\.name"),
                      (base + 'retrieve = "push"\n', r"sources\[0\]\.retrieve"),
                      (base + 'url = "http://pacs/dicom-web"\n', r"sources\[0\]\.url"),
                      ('[[sources]]\nname = "W"\nurl = "pacs/dicom-web"\n', r"sources\[0\]\.url"),
                      ('[[sources]]\nname = "W"\nurl = "http://p/"\nretrieve = "move"\n',
                       r"sources\[0\]\.retrieve")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=key):
            load_config(path)


# ---------------------------------------------------------------- through Orthanc and a running node


@dataclass
class Site:
    """A PACS holding studies, a running node it may move studies to, and the config both share."""

    orthanc: Orthanc
    node: ReaderNode
    config: Path
    workdir: Path

    def backfill(self, *args: str, **popen: object) -> subprocess.Popen[str]:
        """Start ``reader backfill --from PACS ...`` against the node's data dir."""
        cmd = [sys.executable, "-m", "reader.cli", "backfill", "--config", os.fspath(self.config),
               "--data-dir", os.fspath(self.node.data_dir), "--ae-title", NODE_AE,
               "--port", str(self.node.port), "--from", "PACS", *args]
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a backfill to its end."""
        process = self.backfill(*args)
        out, err = process.communicate(timeout=RUN_S)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def state(self, series_uid: str) -> SeriesStatus | None:
        """The node's recorded status of a series."""
        st = JobStore(Spool(self.node.data_dir, min_free_bytes=0)).series_state(series_uid)
        return None if st is None else st.status

    def processed(self) -> Counter[str]:
        """How many times the node read each series (``series.processed`` events)."""
        return Counter(str(e["series_uid"]) for e in self.node.events("series.processed"))

    def stored_at_node(self, study: Study) -> int:
        """How many instances of ``study`` the node holds."""
        return len(Spool(self.node.data_dir, min_free_bytes=0).series_instances(study.study_uid,
                                                                                  study.series_uid))


def _start_site(orthanc_factory: OrthancFactory, tmp_path: Path, *, web: bool = False) -> Site:
    port = free_port()
    orthanc = orthanc_factory(modalities={"reader": (NODE_AE, LOCALHOST, port)},
                              extra_config=dicomweb_config() if web else None)
    model = write_fixture_model(tmp_path / "model")
    if web:
        source = f'url = "{orthanc.base_url}{DICOMWEB_ROOT.rstrip("/")}"\n'
    else:
        source = f'ae_title = "{orthanc.aet}"\nhost = "{LOCALHOST}"\nport = {orthanc.dicom_port}\n'
    text = serve_config(model) + f'\n[[sources]]\nname = "PACS"\n{source}'
    config = tmp_path / "backfill.toml"
    config.write_text(text)
    node = ReaderNode(tmp_path / "node", ae_title=NODE_AE, config_text=text, port=port)
    return Site(orthanc, node, config, tmp_path)


@pytest.fixture
def site(orthanc_factory: OrthancFactory, tmp_path: Path) -> Iterator[Site]:
    """Orthanc that knows the node as a modality (C-FIND/C-MOVE allowed), and the node."""
    started = _start_site(orthanc_factory, tmp_path)
    try:
        yield started
    finally:
        started.node.stop()


def _studies_in_pacs(site: Site, count: int) -> list[Study]:
    studies = [write_study(site.workdir / f"study-{i}", n_slices=12, rows=32, columns=32)
               for i in range(count)]
    sent = storescu(LOCALHOST, site.orthanc.dicom_port, site.orthanc.aet, [s.folder for s in studies])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    return studies


def test_backfill_reads_only_the_studies_not_read_yet(site: Site) -> None:
    """Three CT studies in the PACS, one pushed to the node and read before: the backfill moves and
    reads exactly the other two, each once, records the first as already read, prints its n/N
    progress and exits 0; a second run reads nothing more."""
    first, *others = _studies_in_pacs(site, 3)
    sent = storescu(LOCALHOST, site.node.port, NODE_AE, [first.folder])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: site.state(first.series_uid) is SeriesStatus.DONE, READ_S, "the pushed study read")

    done = site.run("--modality", "CT", "--since", "2024-01-01", "--until", "2024-12-31",
                    "--max-parallel", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[3/3 studies]" in done.stdout and "already_read 1, read 2" in done.stdout, done.stdout
    assert site.processed() == Counter({s.series_uid: 1 for s in (first, *others)}), site.node.log_tail()
    assert all(site.stored_at_node(s) == 12 for s in others)
    holds = site.node.data_dir / "state" / "holds"
    assert not list(holds.glob("*.json")), "every hold ended once its study was queued"

    again = site.run("--modality", "CT", "--since", "2024-01-01")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already_read 3" in again.stdout, again.stdout
    assert sum(site.processed().values()) == 3


def test_a_study_read_by_an_older_model_version_is_read_again(site: Site, tmp_path: Path) -> None:
    """A study the node read before its model was replaced (new weights) is moved and read again,
    as the study's result version 2 by the new model; a second backfill then skips it."""
    study = _studies_in_pacs(site, 1)[0]
    sent = storescu(LOCALHOST, site.node.port, NODE_AE, [study.folder])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: site.state(study.series_uid) is SeriesStatus.DONE, READ_S, "the pushed study read")
    assert site.node.stop() == 0
    newer = write_fixture_model(tmp_path / "model-2", findings=False)
    text = site.config.read_text().replace(str(tmp_path / "model"), str(newer))
    assert str(newer) in text
    site.config.write_text(text)
    site.node = ReaderNode(tmp_path / "node-2", ae_title=NODE_AE, config_text=text, port=site.node.port,
                           data_dir=site.node.data_dir)

    done = site.run("--modality", "CT")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 1" in done.stdout and "already_read" not in done.stdout, done.stdout
    assert (site.node.data_dir / "results" / study.series_uid / "v2" / "sr.dcm").is_file()
    again = site.run("--modality", "CT")
    assert again.returncode == 0 and "read 1" in again.stdout, again.stdout
    assert site.processed() == Counter({study.series_uid: 1}), "read once by the new node, not again"


def test_c_get_source_reads_through_the_backfill(site: Site) -> None:
    """With ``retrieve = "get"`` the PACS never connects to the node: the backfill C-GETs each series
    and stores it to the node itself; both studies are read once and no staged file is left."""
    studies = _studies_in_pacs(site, 2)
    site.config.write_text(site.config.read_text() + 'retrieve = "get"\n')
    done = site.run("--modality", "CT")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "read 2" in done.stdout, done.stdout
    assert site.processed() == Counter({s.series_uid: 1 for s in studies}), site.node.log_tail()
    callers = {e["calling_ae"] for e in site.node.events("association.accepted")}
    assert site.orthanc.aet not in callers and NODE_AE in callers, callers
    assert not any((site.node.data_dir / "backfill-staging").rglob("*.dcm"))


def test_dicomweb_source_finds_by_qido_rs_and_reads_through_wado_rs(orthanc_factory: OrthancFactory,
                                                                    tmp_path: Path) -> None:
    """A source given by its DICOMweb URL: QIDO-RS finds the studies (paged: a page size of one
    still yields all three, each once), WADO-RS brings each series to the backfill, which stores it
    to the node; with --limit 2 exactly two studies are read, once each."""
    site = _start_site(orthanc_factory, tmp_path, web=True)
    try:
        studies = _studies_in_pacs(site, 3)
        paged = DicomWebSource(f"{site.orthanc.base_url}{DICOMWEB_ROOT}", page_size=1)
        found = [m.study_uid for m in paged.find_studies(StudyQuery(modality="CT"))]
        assert sorted(found) == sorted(s.study_uid for s in studies)
        done = site.run("--modality", "CT", "--since", "2024-01-01", "--limit", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "[2/2 studies]" in done.stdout and "read 2" in done.stdout, done.stdout
        read = site.processed()
        assert sum(read.values()) == 2 and set(read.values()) == {1}, site.node.log_tail()
        assert set(read) < {s.series_uid for s in studies}
    finally:
        site.node.stop()


def test_backfill_resumes_after_sigkill_without_reading_a_study_twice(site: Site) -> None:
    """A backfill killed (SIGKILL) once the first study's move reached the node, run again, finishes
    with exit 0; every study is read exactly once and has exactly one result version."""
    studies = _studies_in_pacs(site, 3)
    by_uid = sorted(studies, key=lambda s: s.study_uid)  # the backfill goes in study UID order
    process = site.backfill("--modality", "CT")
    try:
        wait_until(lambda: site.stored_at_node(by_uid[0]) == 12 or process.poll() is not None, RUN_S,
                   "the first study moved to the node")
    finally:
        process.kill()
        process.communicate(timeout=30)
    assert site.stored_at_node(by_uid[1]) < 12, "killed before the second study's move ended"

    done = site.run("--modality", "CT")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[3/3 studies]" in done.stdout
    assert site.processed() == Counter({s.series_uid: 1 for s in studies}), site.node.log_tail()
    for s in studies:
        versions = sorted(p.name for p in (site.node.data_dir / "results" / s.series_uid).iterdir())
        assert versions == ["v1"], f"{s.series_uid}: {versions}"


def test_dry_run_lists_and_reads_nothing(site: Site) -> None:
    """--dry-run prints each matching study with "would read" and retrieves nothing: the node
    receives no instance and no progress record is written."""
    studies = _studies_in_pacs(site, 2)
    done = site.run("--modality", "CT", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    for s in studies:
        assert f"{s.study_uid} 20240102 12 instances: would read" in done.stdout, done.stdout
    assert "2 studies matched; nothing retrieved" in done.stdout
    incoming = site.node.data_dir / "incoming"
    assert not incoming.exists() or not any(incoming.iterdir())
    assert not (site.node.data_dir / "state" / "backfill").exists()


def test_outside_the_window_the_backfill_waits_and_retrieves_nothing(site: Site) -> None:
    """With a window that opens in two hours the backfill lists the studies, says how long it
    waits, moves nothing; SIGTERM ends the wait at once (exit 1: not finished)."""
    study = _studies_in_pacs(site, 1)[0]
    now = datetime.now()
    window = f"{(now + timedelta(hours=2)):%H:%M}-{(now + timedelta(hours=3)):%H:%M}"
    process = site.backfill("--window", window)
    lines: list[str] = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line)
            if "outside the window" in line:
                break
        assert any(f"outside the window {window}: waiting 2 h 00 min" in x
                   or f"outside the window {window}: waiting 1 h 59 min" in x for x in lines), lines
        assert site.stored_at_node(study) == 0
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1, out + err
    assert site.stored_at_node(study) == 0


@pytest.mark.filterwarnings("ignore:The value length .* exceeds the maximum length")
def test_a_partial_move_is_retried_and_never_read_incomplete(site: Site) -> None:
    """A study with one instance the node refuses (a SOP Instance UID over 64 characters): the
    C-MOVE ends with a failed sub-operation, the backfill moves the missing instance again, records
    the study incomplete, and the node, held back, does not read the eleven instances it has."""
    study = write_study(site.workdir / "partial", n_slices=12, rows=32, columns=32)
    bad = pydicom.dcmread(study.files[0])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2." + "3" * 70
    bad.save_as(study.files[0])
    sent = storescu(LOCALHOST, site.orthanc.dicom_port, site.orthanc.aet, [study.folder])
    assert sent.returncode == 0, sent.stdout + sent.stderr

    done = site.run("--modality", "CT")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "incomplete 1" in done.stdout and "1 of 12 instances missing" in done.stdout, done.stdout
    assert site.stored_at_node(study) == 11
    record = next((site.node.data_dir / "state" / "backfill").rglob(f"{study.study_uid}.json"))
    assert json.loads(record.read_text())["status"] == "incomplete"
    wait_until(lambda: bool(site.node.events("study.held")), 30, "the node holding the study back")
    held = site.node.events("study.held")
    assert all(e["missing_instances"] == 1 for e in held)
    assert site.processed() == Counter(), "the node read a study from an incomplete set"
    assert site.state(study.series_uid) is None


def test_an_unknown_source_or_a_bad_flag_is_one_line_and_exit_2(site: Site) -> None:
    """An unknown --from, a bad date or window, and --until before --since each exit 2 with one line
    naming the flag; an unreachable PACS is one line and exit 1."""
    for args, key in ((["--since", "2026-13-01"], "--since"), (["--window", "22:00-6pm"], "--window"),
                      (["--since", "2026-02-01", "--until", "2026-01-01"], "--until"),
                      (["--limit", "0"], "--limit"), (["--from", "NOPE"], "--from")):
        done = site.run(*args)
        assert done.returncode == 2 and key in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    site.orthanc.kill()
    done = site.run("--modality", "CT")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "source PACS" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
