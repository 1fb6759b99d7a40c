"""Shared fixtures. ``each_route`` runs a test once per kernel route this host can run,
or only the route ``NBMOE_ISA`` names when it is set (``NBMOE_ISA=generic pytest`` tests
the generic route alone).

Under pytest-xdist (``-n auto --dist loadgroup``) every route-parametrised test carries
the ``xdist_group`` of its route: each route's kernels are their own Numba types and cost
tens of seconds to compile cold, so one worker compiles a route and runs all of its tests
while the other workers take the other routes."""

import os

import pytest

from nbmoe.kernels import isa

RUNNABLE = [os.environ["NBMOE_ISA"]] if os.environ.get("NBMOE_ISA") else isa.runnable()
ROUTE_PARAMS = [pytest.param(r, id=r, marks=pytest.mark.xdist_group(r)) for r in RUNNABLE]


@pytest.fixture(params=ROUTE_PARAMS)
def each_route(request, monkeypatch):
    monkeypatch.setenv("NBMOE_ISA", request.param)
    return request.param
