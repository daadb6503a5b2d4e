"""The fake Junction API works without an event loop and from another process, as the tests that
run the real server process need."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import SCENARIOS
from tests.fake_junction import FakeJunction

REDRAW = next(s for s in SCENARIOS if s["scenario"] == "redraw_completed")
TRANSACTION_ID = REDRAW["expect"]["transaction_id"]

# Run in a child process: what a server process started by a test does with the fake's URL.
CHILD = """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"X-Vital-API-Key": sys.argv[2]})
with urllib.request.urlopen(request, timeout=10) as response:
    print(json.dumps({"status": response.status, "body": json.load(response)}))
"""


def test_another_process_reads_the_fake_with_the_api_key(fake_junction: FakeJunction) -> None:
    fake_junction.load_scenario(REDRAW)
    url = f"{fake_junction.base_url}/v3/order_transaction/{TRANSACTION_ID}"

    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, fake_junction.api_key],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    answer = json.loads(child.stdout)
    assert answer["status"] == 200
    assert answer["body"]["id"] == TRANSACTION_ID
    assert answer["body"]["status"] == "completed"
    [request] = fake_junction.requests_to("order_transaction")
    assert request.headers["x-vital-api-key"] == fake_junction.api_key


def test_a_sync_caller_without_the_key_is_refused(fake_junction: FakeJunction) -> None:
    fake_junction.load_scenario(REDRAW)
    url = f"{fake_junction.base_url}/v3/order_transaction/{TRANSACTION_ID}"

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)

    assert refused.value.code == 401
    assert json.load(refused.value) == {"detail": "Invalid API key"}


def test_faults_are_consumed_in_order_then_the_data_is_served() -> None:
    with FakeJunction(api_key="k") as fake:
        fake.load_scenario(REDRAW)
        fake.fail("order_transaction", 500, times=2)
        fake.fail("order_transaction", 429, retry_after=3)
        url = f"{fake.base_url}/v3/order_transaction/{TRANSACTION_ID}"
        request = urllib.request.Request(url, headers={"X-Vital-API-Key": "k"})

        codes = []
        for _ in range(4):
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    codes.append((response.status, None))
            except urllib.error.HTTPError as error:
                codes.append((error.code, error.headers.get("Retry-After")))

    assert codes == [(500, None), (500, None), (429, "3"), (200, None)]
