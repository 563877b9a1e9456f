"""Routing: which model package processes a series, decided by declarative rules.

Rules (:class:`reader.config.Route`) are checked in the configured order; the first whose every
criterion holds wins. No user expression is evaluated: criteria are lists, a regular expression
and numeric ranges. A series no rule matches is skipped, with the reason of each rule's miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reader.assemble import SeriesSummary
from reader.config import Route

__all__ = ["RouteMatch", "Skip", "route_series"]


@dataclass(frozen=True)
class RouteMatch:
    """The series goes to ``route.model``."""

    route: Route


@dataclass(frozen=True)
class Skip:
    """No route matched; ``reason`` lists why each rule declined."""

    reason: str


def _miss(route: Route, s: SeriesSummary) -> str | None:
    """Why ``route`` does not match ``s``, or None when it does."""
    checks: list[tuple[bool, str]] = [
        (bool(route.modalities) and s.modality not in route.modalities, f"modality {s.modality or '-'}"),
        (bool(route.sop_classes) and s.sop_class_uid not in route.sop_classes,
         f"SOP class {s.sop_class_uid}"),
        (bool(route.body_parts) and s.body_part not in route.body_parts, f"body part {s.body_part or '-'}"),
        (route.series_description is not None
         and route.series_description.search(s.series_description) is None, "series description"),
        (route.min_instances is not None and s.instance_count < route.min_instances,
         f"{s.instance_count} instances < {route.min_instances}"),
        (route.max_instances is not None and s.instance_count > route.max_instances,
         f"{s.instance_count} instances > {route.max_instances}"),
    ]
    t = s.slice_thickness_mm
    if route.min_slice_thickness_mm is not None or route.max_slice_thickness_mm is not None:
        low = route.min_slice_thickness_mm if route.min_slice_thickness_mm is not None else 0.0
        high = route.max_slice_thickness_mm if route.max_slice_thickness_mm is not None else float("inf")
        checks.append((t is None or not low <= t <= high, f"slice thickness {t} mm"))
    for failed, why in checks:
        if failed:
            return why
    return None


def route_series(routes: Sequence[Route], summary: SeriesSummary) -> RouteMatch | Skip:
    """The first route matching ``summary``, or Skip with every rule's reason."""
    reasons = []
    for route in routes:
        why = _miss(route, summary)
        if why is None:
            return RouteMatch(route)
        reasons.append(f"{route.name}: {why}")
    return Skip("no route matched (" + "; ".join(reasons) + ")" if reasons else "no routes configured")
