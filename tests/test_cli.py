"""The ``reader`` command line as a person uses it: ``reader status`` tables and ``--json``, and
flag errors answered with the command's own usage."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from reader import cli
from reader.jobs import JobStore, SendState, SeriesState, SeriesStatus
from reader.spool import Spool
from reader.state import SCHEMA_VERSION, Database
from reader.state import schema as state_schema
from tests.node_process import ReaderNode
from tests.peers import LOCALHOST, echoscu, free_port, require_data, storescu, wait_until
from tests.reliability import refused_port, serve_config, write_fixture_model

_TIMEOUT_S = 60
_DEADLINE_S = 120.0
SAMPLE_SERIES = ("lung-pet-ct-dx/ct-A0001-5mm-lung-kernel", "lung-pet-ct-dx/ct-A0001-5mm-standard-kernel")
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
FLAGGED = {"state": "flagged", "rule": "any finding", "triggering_findings": [1]}


def _reader(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reader.cli", *args], capture_output=True, text=True,
                          timeout=_TIMEOUT_S, check=False)


def _data_dir(tmp_path: Path) -> Path:
    """Two studies (one flagged with a skipped series, one failed) and a pending, a parked and a
    delivered send."""
    jobs = JobStore(Spool(tmp_path / "data"))
    jobs.record_series(SeriesState(STUDY_A, STUDY_A + ".1", 1, ("1.1",), SeriesStatus.DONE, flag=FLAGGED))
    jobs.record_series(SeriesState(STUDY_A, STUDY_A + ".2", 1, ("1.2",), SeriesStatus.SKIPPED,
                                   reason="study read from series 1"))
    jobs.record_series(SeriesState(STUDY_B, STUDY_B + ".1", 2, ("2.1",), SeriesStatus.FAILED,
                                   reason="internal error: RuntimeError"))
    pending = jobs.add_send(STUDY_A + ".1", 1, "PACS@10.0.0.1:104", [])
    jobs.update_send(replace(pending, attempts=2, next_attempt_at=4102444800.0,  # 2100-01-01
                             last_error="connection refused"))
    parked = jobs.add_send(STUDY_A + ".1", 1, "ARCHIVE@10.0.0.2:104", [])
    jobs.update_send(replace(parked, state=SendState.FAILED, attempts=1, last_error="0xA900 (refused)"))
    done = jobs.add_send(STUDY_A + ".1", 1, "mllp://10.0.0.3:2575", [])
    jobs.update_send(replace(done, state=SendState.DONE, attempts=1))
    return jobs.spool.root


def test_status_prints_readable_tables(tmp_path: Path) -> None:
    """``reader status`` prints tables, not Python dict text: series by state, the last studies
    (latest first, with their flag and series by state), pending sends with their next attempt
    and parked sends with their reason, and the series not processed with why."""
    data = _data_dir(tmp_path)
    done = _reader("status", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "{" not in out and "'" not in out, out
    lines = [line.split() for line in out.splitlines()]
    assert ["done", "1"] in lines and ["skipped", "1"] in lines and ["failed", "1"] in lines
    assert ["queued", "0"] in lines
    assert "Last studies (2 of 2, latest first)" in out
    studies = [line for line in out.splitlines() if STUDY_A in line or STUDY_B in line]
    assert STUDY_B in studies[0] and "failed" in studies[0]  # recorded last: listed first
    assert "flagged" in studies[1] and "1 done, 1 skipped" in studies[1]
    assert "Pending sends: 1" in out and "Parked sends: 1" in out
    pending = next(line for line in out.splitlines() if "PACS@10.0.0.1:104" in line)
    assert "connection refused" in pending and "2100-01-01 00:00:00" in pending
    parked = next(line for line in out.splitlines() if "ARCHIVE@10.0.0.2:104" in line)
    assert "0xA900 (refused)" in parked
    assert "Sends: 1 done, 1 failed, 1 pending" in out
    assert any("study read from series 1" in line for line in out.splitlines())


def test_status_json_is_valid_json_with_studies_and_sends(tmp_path: Path) -> None:
    """``reader status --json`` prints one JSON document: the counts as before, the last studies
    and the pending and parked sends."""
    done = _reader("status", "--json", "--data-dir", str(_data_dir(tmp_path)))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["series"] == {"done": 1, "skipped": 1, "failed": 1}
    assert report["sends"] == {"pending": 1, "failed": 1, "done": 1}
    assert report["queued_jobs"] == 0
    assert [(s["study_uid"], s["flag"], s["version"]) for s in report["studies"]] == [
        (STUDY_B, "", 2), (STUDY_A, "flagged", 1)]
    assert [(p["destination"], p["attempts"]) for p in report["pending_sends"]] == [("PACS@10.0.0.1:104", 2)]
    assert [(f["destination"], f["error"]) for f in report["failed_sends"]] == [
        ("ARCHIVE@10.0.0.2:104", "0xA900 (refused)")]
    assert {s["status"] for s in report["skipped_or_failed_series"]} == {"skipped", "failed"}


def test_status_of_an_empty_data_dir(tmp_path: Path) -> None:
    """A data dir with nothing received yet gives zero counts and says there are no studies."""
    (tmp_path / "data").mkdir()
    done = _reader("status", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert "Studies: none" in done.stdout and "Pending sends: 0" in done.stdout


def test_unknown_flag_prints_the_commands_usage_and_exits_2() -> None:
    """``reader serve --bogus`` names the flag under serve's own usage (with --log-level), not the
    top-level one, and exits 2; so does ``reader status --bogus``."""
    done = _reader("serve", "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: reader serve "), done.stderr
    assert "--log-level" in done.stderr
    assert "reader serve: error: unrecognized arguments: --bogus" in done.stderr
    status = _reader("status", "--bogus")
    assert status.returncode == 2
    assert status.stderr.startswith("usage: reader status "), status.stderr


@pytest.mark.integration
def test_the_readmes_first_run_sample_study_then_status(tmp_path: Path) -> None:
    """As the README's first run goes (with the fixture model for speed): the sample study sent
    with storescu is accepted with an ``association.accepted`` event naming the calling AE, read
    once (one series done, the other skipped for it), and ``reader status`` lists the study."""
    series = [require_data(s) for s in SAMPLE_SERIES]
    node = ReaderNode(tmp_path / "node", config_text=serve_config(write_fixture_model(tmp_path / "model")))
    try:
        sent = storescu(node.host, node.port, node.ae_title, series, calling_ae="CT_SCANNER_1")
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: bool(node.events("series.processed")), _DEADLINE_S, "the sample study read")
        accepted = node.events("association.accepted")
        assert [(e["calling_ae"], e["address"]) for e in accepted] == [("CT_SCANNER_1", "127.0.0.1")]
    finally:
        assert node.stop() == 0, node.log_tail()
    done = _reader("status", "--data-dir", str(node.data_dir))
    assert done.returncode == 0, done.stderr
    study = next(line for line in done.stdout.splitlines() if "1 done, 1 skipped" in line)
    assert "flagged" in study, done.stdout


def test_serve_help_names_the_roles_device_and_name() -> None:
    """``reader serve --help`` lists the roles (all, receiver, worker), ``--device cpu|cuda:N`` and
    ``--name``; an unknown role is refused under serve's usage with exit 2."""
    done = _reader("serve", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--role {all,receiver,worker}" in text and "receiver = DICOM listener" in text
    assert "--device cpu|cuda:N" in text and "--name NAME" in text
    bad = _reader("serve", "--role", "scheduler")
    assert bad.returncode == 2
    assert bad.stderr.startswith("usage: reader serve "), bad.stderr
    assert "invalid choice: 'scheduler'" in bad.stderr


@pytest.mark.parametrize(("args", "flag"), [
    (("--device", "gpu0"), "--device"),
    (("--device", "cuda:-1"), "--device"),
    (("--role", "receiver", "--device", "cpu"), "--device"),
    (("--name", "../etc"), "--name"),
])
def test_bad_serve_flags_exit_2_naming_the_flag(tmp_path: Path, args: tuple[str, ...], flag: str) -> None:
    """A device other than cpu or cuda:N, a device for a receiver (which runs no model) or a process
    name unfit for a file name: one line naming the flag, exit 2, before any port opens."""
    done = _reader("serve", "--data-dir", str(tmp_path / "d"), "--port", str(free_port()), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"reader: configuration error: {flag}:")
    assert not (tmp_path / "d").exists()


def test_a_receiver_loads_no_model(tmp_path: Path) -> None:
    """``--role receiver`` starts and answers C-ECHO with a configured model that cannot load (it
    never reads a series; it logs no ``model.loaded``) and exits 0 on SIGTERM, while ``--role worker``
    with the same file exits 2 with a configuration error naming ``--device`` (the models cannot
    load on it)."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    config = tmp_path / "reader.toml"
    config.write_text(f'[models.broken]\npath = "{broken}"\n\n[[routes]]\nname = "ct"\nmodel = "broken"\n'
                      'modalities = ["CT"]\n\n[web]\nenabled = false\n', encoding="utf-8")
    common = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--bind", LOCALHOST]
    worker = _reader(*common, "--port", str(free_port()), "--role", "worker", "--device", "cpu")
    assert worker.returncode == 2
    assert worker.stderr.strip().splitlines()[-1].startswith("reader: configuration error: --device:")
    receiver = ReaderNode(tmp_path / "receiver", config_text=config.read_text(encoding="utf-8"),
                          data_dir=tmp_path / "data", web=False, role="receiver", name="rx-1")
    try:
        def answers() -> bool:
            return (receiver.process.poll() is not None
                    or echoscu(LOCALHOST, receiver.port, "SECONDREADER").returncode == 0)

        wait_until(answers, _DEADLINE_S, "the receiver to answer C-ECHO")
        assert receiver.process.poll() is None, receiver.log_tail()
    finally:
        code = receiver.stop()
    output = receiver.log_path.read_text(encoding="utf-8", errors="replace")
    assert code == 0, receiver.log_tail()
    assert "model.loaded" not in output


def test_an_unreachable_database_exits_2_with_one_line_without_its_password(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``reader status`` with a ``[cluster] database`` nobody answers on prints one line naming the
    database, with its password replaced by ``***``, and exits 2."""
    (tmp_path / "data").mkdir()
    with refused_port() as port:
        url = f"postgresql://reader:hunter2@127.0.0.1:{port}/reader"
        config = tmp_path / "reader.toml"
        config.write_text(f'[cluster]\ndatabase = "{url}"\n', encoding="utf-8")
        assert cli.main(["status", "--config", str(config), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reader: state database unavailable: "), err
    assert "hunter2" not in err and f"reader:***@127.0.0.1:{port}/reader" in err


def test_a_state_database_of_a_newer_version_exits_2_saying_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A data dir whose state database a newer version migrated (its schema_version above this
    code's) makes ``reader status`` print one line saying so and exit 2."""
    data = Spool(tmp_path / "data").root
    database = Database.open(None, data)
    with database.transaction() as conn:
        conn.execute(state_schema.schema_version.update().values(version=SCHEMA_VERSION + 1))
    database.close()
    capsys.readouterr()  # what the set-up logged
    assert cli.main(["status", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("reader: state database schema too new for this version: "), err
    assert f"schema version {SCHEMA_VERSION + 1}" in err
