"""Schemathesis fuzzes a running `easel serve`, driven by the /openapi.json that server serves.

Every documented operation gets schema-driven requests (valid and invalid bodies, path and query
parameters, headers) from Schemathesis's examples, coverage and fuzzing phases, with an API key
and without one; every response must be no 5xx, have a documented status code and content type,
and match its documented schema. Deterministic (a fixed seed, derandomized Hypothesis, no example
database), so CI sends the same requests every run.

Run by .ci/run after `cargo build`: pytest tests/fuzz
"""

import atexit
import collections
import os
import re

import hypothesis
import pytest
import schemathesis
from schemathesis import checks as st_checks

from easel_process import start

SECRET = "secret"
SEED = 20240611
# Fuzzing-phase examples per operation with a key (the examples and coverage phases add their
# own cases), and without one (where everything under /v1 answers 401).
MAX_EXAMPLES = int(os.environ.get("EASEL_FUZZ_MAX_EXAMPLES", "100"))
MAX_EXAMPLES_WITHOUT_KEY = 5
# Stateful scenarios (create a job, then read, follow or cancel it through the links).
MAX_SCENARIOS = 30
MIN_REQUESTS = 500

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
]

# Requests sent, by test; responses, by operation and status.
SENT = {"with a key": 0, "without a key": 0, "stateful": 0}
STATUSES = collections.Counter()


def stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# Schemathesis parametrizes the tests from the schema while pytest collects them, so the server
# starts when this module is imported (schemathesis.pytest.from_fixture, which would defer it to a
# fixture, reads pytest's internal `_nodeid`, which pytest 9.2 no longer has). A rate far above what the fuzzer sends, so that 429s
# do not stand in for the real answers.
PROC, BASE = start(["--api-key", f"alice:{SECRET}:1000000"])
atexit.register(stop, PROC)


@pytest.fixture(scope="module", autouse=True)
def server():
    yield BASE
    stop(PROC)


def load(headers, max_examples):
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": BASE,
            "headers": headers,
            "request-timeout": 120,
            "generation": {
                "mode": "all",
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",
                # A failure is reported with the request that triggered it, unshrunk: shrinking
                # re-runs generations on the model and could take many minutes.
                "no-shrink": True,
            },
        }
    )
    return schemathesis.openapi.from_url(f"{BASE}/openapi.json", config=config, timeout=30)


schema = load({"Authorization": f"Bearer {SECRET}"}, MAX_EXAMPLES)
schema_without_key = load({}, MAX_EXAMPLES_WITHOUT_KEY)


def cheap(case):
    """Keeps image requests cheap. The server runs a real diffusion model on the CPU (a debug
    build: 30 steps at 64x64 took 23 s on 2 cores), and the schema allows 1000 steps, 10 images
    and 2048x2048, which would make this run take hours. Valid but costly values are
    lowered (steps and n to 1, a missing step count to 1, sizes over 64x64 pixels to 64x64);
    invalid values are left alone, so the server's rejection of them is still exercised."""
    body = case.body
    if case.operation.method.upper() != "POST" or case.operation.path not in ("/v1/images/generations", "/v1/jobs"):
        return
    if not isinstance(body, dict):
        return
    steps = body.get("steps")
    if steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and 1 < steps <= 1000):
        body["steps"] = 1
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 < n <= 10:
        body["n"] = 1
    size = body.get("size")
    if isinstance(size, str):
        m = re.fullmatch(r"(\d+)x(\d+)", size)
        if m and 0 < int(m.group(1)) <= 2048 and 0 < int(m.group(2)) <= 2048 and int(m.group(1)) * int(m.group(2)) > 64 * 64:
            body["size"] = "64x64"


@schema.parametrize()
def test_api_conforms_to_its_openapi(case):
    cheap(case)
    SENT["with a key"] += 1
    response = case.call_and_validate(checks=CHECKS)
    STATUSES[("with a key", case.operation.label, response.status_code)] += 1


@schema_without_key.parametrize()
def test_api_without_a_key_conforms_too(case):
    cheap(case)
    SENT["without a key"] += 1
    response = case.call_and_validate(checks=CHECKS)
    STATUSES[("without a key", case.operation.label, response.status_code)] += 1


class JobWorkflow(schema.as_state_machine()):
    """Sequences that follow the document's links: a job (or a generation) is created, then read,
    followed over server-sent events and canceled by its id."""

    def before_call(self, case):
        cheap(case)

    def validate_response(self, response, case, additional_checks=None, **kwargs):
        SENT["stateful"] += 1
        STATUSES[("stateful", case.operation.label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)


TestJobWorkflow = JobWorkflow.TestCase
TestJobWorkflow.settings = hypothesis.settings(
    TestJobWorkflow.settings,
    max_examples=MAX_SCENARIOS,
    stateful_step_count=6,
    derandomize=True,
    database=None,
)


def test_enough_requests_were_sent(capsys):
    total = sum(SENT.values())
    with capsys.disabled():
        print(f"\nschemathesis sent {total} requests: {SENT}")
    for (test, label, status), count in sorted(STATUSES.items()):
        print(f"  {test}: {label} {status}: {count}")
    if SENT["with a key"] == 0:
        pytest.skip("the fuzz tests did not run")
    assert total >= MIN_REQUESTS, SENT
