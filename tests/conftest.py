"""Shared test helpers: the delivery scenarios copied from the provider-shaped fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "junction"


def load_scenarios() -> list[dict[str, Any]]:
    """Each scenario: {scenario, note, deliveries: [{svix_id, body}], expect}."""
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))]


SCENARIOS = load_scenarios()


@pytest.fixture(params=SCENARIOS, ids=[s["scenario"] for s in SCENARIOS])
def scenario(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.param
