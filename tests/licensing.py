"""Licences of installed distributions, read from their metadata (importlib.metadata).

The project's own requirements come from pyproject.toml (not from the installed metadata of this
package, which an editable install freezes at install time); each is followed through the
``Requires-Dist`` of the installed distributions, markers evaluated without extras, so the set is
what ``pip install .`` plus one onnxruntime extra installs. A licence is read from
``License-Expression`` (SPDX, PEP 639) when present, else from the licence classifiers, else from
the first line of ``License``: the free-text field sometimes holds a whole licence file listing
bundled libraries, whose mentions are not the distribution's own licence.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

__all__ = ["PYPROJECT", "Licence", "is_gpl", "is_lgpl", "licence_of", "normalize", "required_distributions"]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# GPL, AGPL, GPLv3+, "GNU General Public License", "GNU Affero ..." but not LGPL or "Lesser"/"Library".
_GPL = re.compile(r"(?<![L\w])A?GPL|GNU (Affero )?General Public Licen[sc]e", re.IGNORECASE)
_LGPL = re.compile(r"\bLGPL|GNU (Lesser|Library) General Public Licen[sc]e", re.IGNORECASE)


@dataclass(frozen=True)
class Licence:
    """One distribution's declared licence and where in its metadata it was read."""

    distribution: str
    version: str
    text: str
    source: str  # "License-Expression", "classifier" or "License"


def normalize(name: str) -> str:
    """A distribution name as PEP 503 normalizes it (``Python_GDCM`` -> ``python-gdcm``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_gpl(text: str) -> bool:
    """True for a GPL or AGPL licence (any version), False for LGPL and everything else."""
    return bool(_GPL.search(text))


def is_lgpl(text: str) -> bool:
    """True for an LGPL licence (any version)."""
    return bool(_LGPL.search(text))


def licence_of(name: str) -> Licence:
    """The declared licence of the installed distribution ``name``."""
    dist = metadata.distribution(name)
    meta = dist.metadata
    dist_name, version = str(meta["Name"]), str(meta["Version"])
    expression = meta.get("License-Expression")
    if expression:
        return Licence(dist_name, version, str(expression), "License-Expression")
    classifiers = [
        c.removeprefix("License :: ").removeprefix("OSI Approved :: ")
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if classifiers:
        return Licence(dist_name, version, "; ".join(classifiers), "classifier")
    first_line = (meta.get("License") or "").strip().splitlines()
    return Licence(dist_name, version, first_line[0] if first_line else "", "License")


def _project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _wanted(line: str, extras: frozenset[str]) -> Requirement | None:
    """``line`` as a Requirement if its marker holds here for no extra or one of ``extras``."""
    req = Requirement(line)
    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
        return req
    return None


def required_distributions(extras: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Installed distributions the project requires with ``extras``, transitively.

    Returns ({normalized name: the chain of requirements that pulls it in}, [requirements not
    installed]). Markers are evaluated for this interpreter; a requirement's own extras
    (``pylibjpeg[libjpeg]``) bring in what that extra of its distribution requires.
    """
    found: dict[str, str] = {}
    absent: list[str] = []
    expanded: set[tuple[str, str]] = set()
    top = [_wanted(str(req), frozenset()) for req in _project_requirements(extras)]
    queue = [(req, "pyproject.toml") for req in top if req is not None]
    while queue:
        req, chain = queue.pop()
        key = normalize(req.name)
        wanted = {"", *req.extras} - {e for k, e in expanded if k == key}
        if not wanted:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            absent.append(f"{req} (from {chain})")
            continue
        found.setdefault(key, f"{chain} -> {key}")
        expanded |= {(key, e) for e in wanted}
        for line in dist.requires or []:
            if (sub := _wanted(line, frozenset(wanted))) is not None:
                queue.append((sub, found[key]))
    return found, absent
