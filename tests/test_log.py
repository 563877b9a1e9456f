"""The node's log: library warnings say what they are about without their text, and the README's
event table names exactly the events the code logs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from reader.log import warning_event

REPO = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 60
# A structlog call with a literal event name: log.info("series.complete", ...), bound.error(...).
_LOGGED = re.compile(r"\.(debug|info|warning|error|exception|critical)\(\s*\"([a-z0-9_]+(?:\.[a-z0-9_]+)+)\"")
_LEVEL = {"exception": "error", "critical": "error"}
# A row of the README's event table: | `series.complete` | info | ... |
_ROW = re.compile(r"^\| `([a-z0-9_]+(?:\.[a-z0-9_]+)+)` \| (debug|info|warning|error) \|", re.MULTILINE)


@contextmanager
def _library_warnings() -> Iterator[list[dict[str, Any]]]:
    """Warnings raised inside go through the node's warning handler; yields the captured events."""
    with warnings.catch_warnings(), capture_logs() as logs:
        warnings.simplefilter("always")
        warnings.showwarning = warning_event
        yield logs


def test_highdicom_person_name_warning_names_the_attribute_not_the_value() -> None:
    """highdicom's warning about a one-component patient name (which quotes the name) is logged as
    library.warning with its category, library, problem and attribute (PatientName), and without
    the name."""
    with _library_warnings() as logs:
        hd.SOPClass(study_instance_uid=generate_uid(), series_instance_uid=generate_uid(), series_number=1,
                    sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    instance_number=1, modality="SR", patient_name="Zyxwvutsrq")
    events = [e for e in logs if e["event"] == "library.warning"]
    assert events, logs
    assert {k: events[0].get(k) for k in ("category", "library", "problem", "attribute")} == {
        "category": "UserWarning", "library": "highdicom", "problem": "person name of one component",
        "attribute": "PatientName"}
    assert "Zyxwvutsrq" not in repr(logs)


def test_pydicom_warning_names_the_element_and_vr_and_its_text_stays_out_of_stderr() -> None:
    """An invalid date set by the node is logged (in a process configured as the node configures
    itself) as library.warning naming PatientBirthDate and VR DA; the value, which pydicom also
    sends to its stdlib logger, appears nowhere in stdout or stderr."""
    code = ("from reader.log import configure_logging; configure_logging('info')\n"
            "from pydicom.dataset import Dataset\nds = Dataset()\nds.PatientBirthDate = '1942-03-17'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=_TIMEOUT_S, check=True)
    assert "1942" not in done.stdout + done.stderr, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(e["event"], e["library"], e["problem"], e["vr"], e["attribute"]) for e in events] == [
        ("library.warning", "pydicom", "value invalid for its VR", "DA", "PatientBirthDate")]


def test_unknown_warning_text_is_never_logged() -> None:
    """A warning whose text the node does not know is logged with its category and origin only:
    nothing of the text, and no attribute guessed from it."""
    with _library_warnings() as logs:
        warnings.warn("value 'Qwertyuiop^Asdf' looks odd", RuntimeWarning, stacklevel=1)
    assert len(logs) == 1
    assert {k: logs[0].get(k) for k in ("event", "category", "module")} == {
        "event": "library.warning", "category": "RuntimeWarning", "module": "test_log"}
    assert "problem" not in logs[0] and "attribute" not in logs[0]
    assert "Qwertyuiop" not in repr(logs)


def test_element_set_in_code_is_named_from_the_stack() -> None:
    """A value too long for its VR, set on a pydicom Dataset, names the element being set and the
    VR, never the value."""
    with _library_warnings() as logs:
        Dataset().SeriesDescription = "Mnbvcxz" * 10
    assert [(e["problem"], e["vr"], e["attribute"]) for e in logs] == [
        ("value longer than its VR allows", "LO", "SeriesDescription")]
    assert "Mnbvcxz" not in repr(logs)


def _logged_events() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "reader").rglob("*.py")):
        for method, name in _LOGGED.findall(path.read_text(encoding="utf-8")):
            found.setdefault(name, set()).add(_LEVEL.get(method, method))
    return found


def _readme_events() -> dict[str, str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Logs\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = _ROW.findall(section)
    assert len(rows) == len({name for name, _ in rows}), "an event is listed twice"
    return dict(rows)


def test_readme_lists_every_event_the_node_logs() -> None:
    """The README's "Logs" table names every event a structlog call in reader/ logs, each at the
    level it is logged at, and no event the code no longer logs."""
    logged = _logged_events()
    listed = _readme_events()
    assert len(logged) > 40, "the scan of reader/ found too few events"
    assert sorted(set(logged) - set(listed)) == [], "logged in reader/ but missing from the README"
    assert sorted(set(listed) - set(logged)) == [], "in the README but logged nowhere in reader/"
    wrong = {name: (listed[name], levels) for name, levels in logged.items() if listed[name] not in levels}
    assert wrong == {}, "README level differs from the code's"
