"""Study reading (reader.study, reader.pipeline): one result per study, from the preferred series.

The in-process node is fed by real DCMTK storescu; a small real ONNX model (tests/onnx_fixtures.py)
stands in for the reference model.

Data: patient Lung_Dx-A0001 of the TCIA collection Lung-PET-CT-Dx (CC BY 4.0): Li, P., Wang, S.,
Li, T., Lu, J., HuangFu, Y., & Wang, D. (2020). A Large-Scale CT and PET/CT Dataset for Lung Cancer
Diagnosis [Data set]. The Cancer Imaging Archive. https://doi.org/10.7937/TCIA.2020.NNC20461
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from reader.assemble import SeriesSummary, summarize_series
from reader.config import CompletionConfig, ModelRef, NodeConfig, Route, load_config
from reader.errors import ConfigError
from reader.inference import ModelPackage
from reader.jobs import SeriesStatus
from reader.node import Node
from reader.pipeline import STUDY_READ_FROM
from reader.study import DEFAULT_LUNG_KERNELS, SeriesPreference, choose_series, describe_series
from tests.onnx_fixtures import blob_package
from tests.peers import LOCALHOST, free_port, require_data, require_tool, storescu, wait_until

DEADLINE_S = 120.0
LUNG = SeriesPreference.of(DEFAULT_LUNG_KERNELS)


def summary(uid: str, kernel: str = "", thickness: float | None = 5.0, count: int = 64,
            number: int | None = None) -> SeriesSummary:
    """A CT series summary with the attributes the preference reads."""
    return SeriesSummary(study_uid="1.2.3", series_uid=uid, modality="CT",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.2", body_part="CHEST",
                         series_description="", instance_count=count,
                         slice_thickness_mm=thickness, accession_number_present=False, kernel=kernel,
                         series_number=number)


# ---------------------------------------------------------------- the preference


def test_lung_kernels_of_common_vendors_come_first() -> None:
    """A lung kernel (Philips L, Siemens B70f/Br64/I70f, GE LUNG, Canon FC52) is read before a soft one."""
    for lung, soft in (("L", "B"), ("B70f", "B31f"), ("Br64", "Br40"), ("I70f", "I31f"), ("LUNG", "STANDARD"),
                       ("FC52", "FC13")):
        candidates = [summary("1.1", soft), summary("1.2", lung)]
        assert choose_series(LUNG, candidates).kernel == lung


def test_then_thinnest_then_most_instances() -> None:
    """Among equal kernels the thinnest slices win, then the series with more instances; a series
    without a slice thickness comes last."""
    assert choose_series(LUNG, [summary("1.1", "L", 5.0), summary("1.2", "L", 1.0)]).series_uid == "1.2"
    more = [summary("1.1", "L", 1.0, 100), summary("1.2", "L", 1.0, 300)]
    assert choose_series(LUNG, more).series_uid == "1.2"
    assert choose_series(LUNG, [summary("1.1", "L", None), summary("1.2", "L", 5.0)]).series_uid == "1.2"


def test_unranked_ties_are_broken_by_series_number_then_uid() -> None:
    """Series nothing else tells apart are read once, always the same one: lowest Series Number,
    then lowest Series Instance UID."""
    assert choose_series(LUNG, [summary("1.1", number=7), summary("1.2", number=3)]).series_uid == "1.2"
    same = [summary("1.9"), summary("1.10"), summary("1.2")]
    assert choose_series(LUNG, same).series_uid == "1.10"
    assert choose_series(LUNG, list(reversed(same))).series_uid == "1.10"


def test_reason_names_the_series_read() -> None:
    """The skip reason names the chosen series' UID, number, kernel, thickness and instance count."""
    text = describe_series(summary("1.2.9", "L", 5.0, 64, number=2))
    assert text == "series 1.2.9 (number 2, kernel L, 5 mm, 64 instances)"


def test_routes_read_studies_by_default_and_take_a_kernel_preference(tmp_path: Path) -> None:
    """A route reads a study unless it says read = "series"; [routes.prefer] kernels replace the
    default list; a bad value or pattern is a ConfigError naming the key."""
    model = tmp_path / "pkg"
    model.mkdir()
    base = f'[models.m]\npath = "{model}"\n[[routes]]\nmodel = "m"\n'
    default = load_config(_write(tmp_path, base)).routes[0]
    assert default.read == "study" and default.prefer.kernels[0].pattern == "L"
    custom = load_config(_write(tmp_path, base + 'read = "series"\n[routes.prefer]\nkernels = ["SHARP.*"]\n'))
    assert custom.routes[0].read == "series"
    assert [p.pattern for p in custom.routes[0].prefer.kernels] == ["SHARP.*"]
    for bad, key in (('read = "all"\n', "routes[0].read"), ('[routes.prefer]\nkernels = ["("]\n',
                                                            "routes[0].prefer.kernels")):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(_write(tmp_path, base + bad))


def _write(folder: Path, text: str) -> Path:
    path = folder / "reader.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- through the node


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelPackage:
    """A real ONNX model marking dense (bright) structures, with coarse resampling for speed."""
    return ModelPackage.load(blob_package(tmp_path_factory.mktemp("pkg")))


@pytest.fixture
def node(tmp_path: Path, model: ModelPackage) -> Iterator[Node]:
    """A started node reading studies (the default) without destinations; stopped at teardown."""
    require_tool("storescu")
    config = NodeConfig(
        ae_title="SECONDREADER", bind_address=LOCALHOST, port=free_port(), data_dir=tmp_path / "data",
        completion=CompletionConfig(grace=timedelta(seconds=0.5), idle_timeout=timedelta(seconds=30)),
        models=(ModelRef("blob", Path("unused")),), routes=(Route("ct", "blob", modalities=("CT",)),),
    )
    running = Node(config, {"blob": model})
    running.start()
    yield running
    running.stop()


def _slices(kind: str, out: Path, count: int = 16) -> list[Path]:
    """``count`` consecutive slices of one shared reconstruction, copied to ``out``."""
    series = require_data(f"lung-pet-ct-dx/ct-A0001-5mm-{kind}-kernel")
    files = sorted(series.glob("*.dcm"), key=lambda p: float(
        pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))[24:24 + count]
    out.mkdir(parents=True)
    return [Path(shutil.copy(f, out)) for f in files]


def _thinner_copy(files: list[Path], out: Path) -> list[Path]:
    """The same slices as a new series (new UIDs, Series Number 9) claiming 2.5 mm slices."""
    out.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    copies = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SliceThickness = "2.5"
        ds.SeriesNumber = 9
        copies.append(out / f.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def _uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _settled(node: Node, series_uid: str, status: SeriesStatus) -> bool:
    state = node.jobs.series_state(series_uid)
    return state is not None and state.status is status


def test_a_study_of_two_reconstructions_is_read_once_from_the_lung_kernel(node: Node, tmp_path: Path) -> None:
    """Both reconstructions on one association give one result, read from the lung kernel; the
    soft-kernel series is skipped with a reason naming the series read; a thinner lung-kernel series
    arriving later is read as the study's result version 2, whose SR names version 1 as predecessor."""
    lung = _slices("lung", tmp_path / "lung")
    standard = _slices("standard", tmp_path / "standard")
    sent = storescu(LOCALHOST, node.scp.port, node.config.ae_title, [*lung, *standard])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: _settled(node, _uid(lung), SeriesStatus.DONE)
               and _settled(node, _uid(standard), SeriesStatus.SKIPPED), DEADLINE_S,
               "the lung kernel read and the standard kernel skipped")
    skipped = node.jobs.series_state(_uid(standard))
    assert skipped is not None
    lung_summary = summarize_series("", _uid(lung), lung)
    assert skipped.reason == STUDY_READ_FROM + describe_series(lung_summary)
    assert "kernel L" in skipped.reason
    first = node.spool.result_path(_uid(lung), 1, "sr")
    assert first.is_file()
    assert not node.spool.result_path(_uid(standard), 1, "sr").exists()

    thinner = _thinner_copy(lung, tmp_path / "thin")
    sent = storescu(LOCALHOST, node.scp.port, node.config.ae_title, thinner)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: _settled(node, _uid(thinner), SeriesStatus.DONE), DEADLINE_S,
               "the thinner series read")
    second = node.spool.result_path(_uid(thinner), 2, "sr")
    assert second.is_file(), "the better series gives the study's result version 2"
    sr = pydicom.dcmread(second)
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == pydicom.dcmread(first).SOPInstanceUID


def test_read_series_routes_read_every_series(tmp_path: Path, model: ModelPackage) -> None:
    """With read = "series", each reconstruction is read on its own, as before study reading."""
    require_tool("storescu")
    config = NodeConfig(
        ae_title="SECONDREADER", bind_address=LOCALHOST, port=free_port(), data_dir=tmp_path / "data",
        completion=CompletionConfig(grace=timedelta(seconds=0.5), idle_timeout=timedelta(seconds=30)),
        models=(ModelRef("blob", Path("unused")),),
        routes=(replace(Route("ct", "blob", modalities=("CT",)), read="series"),),
    )
    running = Node(config, {"blob": model})
    running.start()
    try:
        lung = _slices("lung", tmp_path / "lung", count=8)
        standard = _slices("standard", tmp_path / "standard", count=8)
        sent = storescu(LOCALHOST, running.scp.port, running.config.ae_title, [*lung, *standard])
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: _settled(running, _uid(lung), SeriesStatus.DONE)
                   and _settled(running, _uid(standard), SeriesStatus.DONE), DEADLINE_S, "both series read")
    finally:
        running.stop()


def test_a_rejected_first_choice_hands_the_study_to_the_next_series(node: Node, tmp_path: Path) -> None:
    """When the preferred series cannot be read (a missing slice), it is recorded as rejected and the
    study is read from its next choice: the series that had been skipped for it is queued again."""
    lung = _slices("lung", tmp_path / "lung")
    gap = lung.pop(8)
    gap.unlink()
    standard = _slices("standard", tmp_path / "standard")
    # the standard kernel arrives first, so its job runs first and is skipped for the lung kernel
    sent = storescu(LOCALHOST, node.scp.port, node.config.ae_title, [*standard, *lung])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: _settled(node, _uid(standard), SeriesStatus.DONE), DEADLINE_S,
               "the standard kernel read once the lung kernel was rejected")
    rejected = node.jobs.series_state(_uid(lung))
    assert rejected is not None and rejected.status is SeriesStatus.SKIPPED
    assert rejected.reason.startswith("slice_gap"), rejected.reason
    read = node.jobs.series_state(_uid(standard))
    assert read is not None and read.version == 2, "skipped as version 1, queued again as version 2"
    assert node.spool.result_path(_uid(standard), read.version, "sr").is_file()
