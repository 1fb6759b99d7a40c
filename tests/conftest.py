"""Shared fixtures. ``each_route`` runs a test once per kernel route this host can run,
or only the route ``NBMOE_ISA`` names when it is set (``NBMOE_ISA=generic pytest`` tests
the generic route alone)."""

import os

import pytest

from nbmoe.kernels import isa

RUNNABLE = [os.environ["NBMOE_ISA"]] if os.environ.get("NBMOE_ISA") else isa.runnable()


@pytest.fixture(params=RUNNABLE)
def each_route(request, monkeypatch):
    monkeypatch.setenv("NBMOE_ISA", request.param)
    return request.param
