"""Fixtures of the gateway tests: the agents run their app instances on loopback beside them, so
their coordinator accepts loopback instance addresses (`--allow-loopback-instances`)."""

from __future__ import annotations

import pytest


@pytest.fixture
def coordinator(coordinator_factory):
    return coordinator_factory("--allow-loopback-instances")
