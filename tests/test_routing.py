"""Routing rules pick a model per series or record why the series is skipped."""

from __future__ import annotations

import re
from dataclasses import replace

from reader.assemble import SeriesSummary
from reader.config import Route
from reader.routing import RouteMatch, Skip, route_series

CT = SeriesSummary(
    study_uid="1.2", series_uid="1.2.3", modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    body_part="CHEST", series_description="Thorax 5mm lung", instance_count=64, slice_thickness_mm=5.0,
    accession_number_present=True,
)


def test_first_matching_route_wins() -> None:
    """Routes are tried in order; the first whose criteria all hold is chosen."""
    routes = [Route("mr", "m1", modalities=("MR",)), Route("ct", "m2", modalities=("CT",)),
              Route("any", "m3")]
    decision = route_series(routes, CT)
    assert isinstance(decision, RouteMatch)
    assert decision.route.name == "ct"


def test_every_criterion_is_checked() -> None:
    """Body part, description pattern, instance count and slice thickness each exclude a series."""
    base = Route("r", "m", modalities=("CT",))
    misses = [
        replace(base, body_parts=("HEAD",)),
        replace(base, series_description=re.compile("bone", re.IGNORECASE)),
        replace(base, min_instances=100),
        replace(base, max_instances=10),
        replace(base, max_slice_thickness_mm=3.0),
        replace(base, sop_classes=("1.2.840.10008.5.1.4.1.1.4",)),
    ]
    for route in misses:
        assert isinstance(route_series([route], CT), Skip), route
    hit = replace(base, body_parts=("CHEST",), series_description=re.compile("LUNG", re.IGNORECASE),
                  min_instances=16, max_instances=2000, min_slice_thickness_mm=0.5, max_slice_thickness_mm=8)
    assert isinstance(route_series([hit], CT), RouteMatch)


def test_unmatched_series_is_skipped_with_reasons() -> None:
    """A series no rule matches is skipped, and the reason names each rule's miss."""
    decision = route_series([Route("mr", "m", modalities=("MR",))], CT)
    assert isinstance(decision, Skip)
    assert "mr: modality CT" in decision.reason


def test_missing_thickness_fails_a_thickness_rule() -> None:
    """A thickness range never matches a series whose thickness is unknown."""
    route = Route("r", "m", min_slice_thickness_mm=1.0)
    assert isinstance(route_series([route], replace(CT, slice_thickness_mm=None)), Skip)
