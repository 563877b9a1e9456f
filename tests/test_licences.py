"""The default install is free of GPL code, holds one onnxruntime wheel, and LICENSES.md lists it."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from tests.licensing import is_gpl, is_lgpl, licence_of, normalize, required_distributions

LICENSES_MD = Path(__file__).resolve().parents[1] / "LICENSES.md"
ONNXRUNTIME_EXTRAS = {"cpu": "onnxruntime", "gpu": "onnxruntime-gpu"}


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def _onnxruntime_extra() -> str:
    """The onnxruntime extra this environment was installed with (the one wheel that is present)."""
    present = [extra for extra, dist in ONNXRUNTIME_EXTRAS.items() if _installed(dist)]
    assert len(present) == 1, f"expected exactly one onnxruntime wheel, found {present or 'none'}"
    return present[0]


def test_exactly_one_onnxruntime_wheel_is_installed() -> None:
    """onnxruntime and onnxruntime-gpu both install the module `onnxruntime`: one of them, never both."""
    assert _onnxruntime_extra() in ONNXRUNTIME_EXTRAS


@pytest.mark.parametrize(
    ("text", "gpl", "lgpl"),
    [
        ("GNU General Public License v3 (GPLv3); Other/Proprietary License", True, False),
        ("GPL V3.0", True, False),
        ("GPL-2.0-or-later", True, False),
        ("AGPL-3.0-only", True, False),
        ("GNU Affero General Public License v3", True, False),
        ("LGPL-2.1-or-later", False, True),
        ("GNU Lesser General Public License v3 (LGPLv3)", False, True),
        ("MIT OR Apache-2.0", False, False),
        ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", False, False),
    ],
)
def test_licence_classes_are_recognized(text: str, gpl: bool, lgpl: bool) -> None:
    """The GPL test catches GPL and AGPL in SPDX, classifier and free-text spellings, and not LGPL."""
    assert (is_gpl(text), is_lgpl(text)) == (gpl, lgpl)


def test_default_install_has_no_gpl_distribution() -> None:
    """No distribution that pyproject's dependencies (plus the installed onnxruntime extra) pull in,
    transitively, declares a GPL or AGPL licence; each offender is named with its requirement chain."""
    found, absent = required_distributions((_onnxruntime_extra(),))
    assert not absent, f"required but not installed (run scripts/bootstrap): {absent}"
    offenders = [
        f"{lic.distribution} {lic.version}: {lic.text!r} ({lic.source}) via {found[name]}"
        for name in sorted(found)
        if is_gpl((lic := licence_of(name)).text)
    ]
    assert not offenders, "GPL-licensed distributions in the default install:\n" + "\n".join(offenders)


def test_licenses_md_names_every_distribution_installed() -> None:
    """LICENSES.md names every distribution of the runtime and dev installs, so it cannot go stale."""
    text = normalize(LICENSES_MD.read_text(encoding="utf-8"))
    found, _ = required_distributions((_onnxruntime_extra(), "dev"))
    unnamed = sorted(name for name in found if f"`{name}`" not in text and name != "dicom-second-reader")
    assert not unnamed, f"LICENSES.md does not list {unnamed}"
