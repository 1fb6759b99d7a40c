"""Shared fixtures. ``each_route`` runs a test once per kernel route this host can run."""

import pytest

from nbmoe.kernels import isa

RUNNABLE = isa.runnable()


@pytest.fixture(params=RUNNABLE)
def each_route(request, monkeypatch):
    monkeypatch.setenv("NBMOE_ISA", request.param)
    return request.param
