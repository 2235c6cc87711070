"""schemathesis drives every operation of our OpenAPI document: no 5xx, responses match the schema.

Twice: in-process on the embedded default (SQLite), and against a real API process on PostgreSQL, which
refuses what SQLite stores (NUL in text, integers past 32 bits). On PostgreSQL a stateful phase then follows
the document's links (POST /v1/jobs -> GET/cancel/DELETE /v1/jobs/{job_id}, ...), so that ids the API made reach
the routes that take them. The case counts are kept small for the suite; GS_FUZZ_EXAMPLES=500 and
GS_FUZZ_SCENARIOS=500 run a larger campaign.
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.engine.link_calibration import LinkCalibrationState
from schemathesis.generation.feedback import FeedbackSources
from schemathesis.python._constants.orchestrator import make_constants_value_source
from schemathesis.specs.openapi.checks import ensure_resource_availability, use_after_free

from tests.conftest import ADMIN_TOKEN, POSTGRES_URL, Stack, scratch_postgres

EXAMPLES = int(os.environ.get("GS_FUZZ_EXAMPLES", "25"))
SCENARIOS = int(os.environ.get("GS_FUZZ_SCENARIOS", "50"))
STEPS_PER_SCENARIO = 10
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def load_schema():
    from api.app import app  # settings come from tests/conftest.py's private embedded default

    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = load_schema()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(client, case):  # client: migrated database
    # Schema-valid specs may still be refused by the engine (422 invalid_spec): that is a 4xx by
    # design, so "positive data acceptance" is not one of the checks.
    case.call_and_validate(headers=AS_ADMIN, checks=CHECKS)


@pytest.fixture(scope="module")
def postgres_api(tmp_path_factory):
    """The API alone (no worker: fuzzed jobs stay queued) on a database of its own on the test server,
    named after GS_TEST_POSTGRES_URL's so concurrent runs do not share it. The broker is the filesystem
    one: the messages of fuzzed jobs must not reach another stack's worker."""
    database = scratch_postgres(POSTGRES_URL.rsplit("/", 1)[-1] + "_fuzz")
    var_dir = tmp_path_factory.mktemp("fuzz-postgres")
    stack = Stack("fuzz-postgres", {"GS_DATABASE_URL": database, "GS_BROKER_URL": "filesystem://"}, var_dir,
                  serve_args=("--no-worker",))
    yield stack.start(probe="/healthz")
    stack.stop()


# The document that server serves (the same code), as a plain schema: its cases go over HTTP to base_url.
postgres_schema = schemathesis.openapi.from_dict(schema.raw_schema)


@postgres_schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_on_postgresql(postgres_api, case):
    base_url = str(postgres_api.client.base_url)
    case.call_and_validate(base_url=base_url, headers=AS_ADMIN, checks=CHECKS)


# The stateful phase follows the links the document declares (not ones schemathesis would infer). No worker runs
# here, so a queued job never ends: its event stream is left out and its log is read, never followed. Uploads are
# left to the phase above: fuzzed bytes never pass the model check (so their links are never followed), and each
# check starts a sandbox (~0.3 s).
linked_schema = schemathesis.openapi.from_dict(
    schema.raw_schema,
    config=SchemathesisConfig.from_dict({"phases": {"stateful": {"inference": {"algorithms": []}}}}),
).exclude(operation_id=["stream_job_events", "upload_checkpoint"])


class AlwaysFollow(LinkCalibrationState):
    """Every link is followed (random ids are the phase above's business). schemathesis otherwise tosses a coin per
    link outside Hypothesis's record: the same choices then draw more or less, and Hypothesis fails the test as
    flaky generation."""

    def use_probability(self, transition_id: str) -> float:
        return 1.0

    def is_calibrated(self, transition_id: str) -> bool:
        return True


def linked_machine():
    feedback = FeedbackSources(constants_value_source=make_constants_value_source(linked_schema))
    return linked_schema.build_state_machine(feedback=feedback, link_calibration=AlwaysFollow())


def test_linked_calls_find_no_server_errors_on_postgresql(postgres_api):
    base_url = str(postgres_api.client.base_url)
    made: set[str] = set()  # ids of the jobs and keys the API made
    reached: list[str] = []  # operations called with one of them

    class LinkedCalls(linked_machine()):
        def before_call(self, case):
            # A repeated Idempotency-Key replays an earlier answer, or is refused with another body: the same steps
            # would get other answers than before, which Hypothesis takes for flaky generation.
            for name in [h for h in case.headers or {} if h.lower() == "idempotency-key"]:
                del case.headers[name]
            if case.operation.label == "GET /v1/jobs/{job_id}/logs":
                case.query = {**(case.query or {}), "follow": False}  # a queued job's log never ends

        def get_call_kwargs(self, case):
            return {"base_url": base_url, "headers": AS_ADMIN}

        def after_call(self, response, case):
            super().after_call(response, case)
            if case.method == "POST" and response.status_code in (201, 202):
                made.add(response.json()["id"])
            if made & set((case.path_parameters or {}).values()):
                reached.append(case.operation.label)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=[*CHECKS, use_after_free, ensure_resource_availability],
                                   transport_kwargs=kwargs or None, recorder=self.recorder)

    LinkedCalls.run(settings=settings(max_examples=SCENARIOS, stateful_step_count=STEPS_PER_SCENARIO, deadline=None,
                                      phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    # Links were followed with ids the API made: a job's, and a key's.
    assert any("/v1/jobs/{job_id}" in label for label in reached), reached
    assert "DELETE /v1/api-keys/{key_id}" in reached, reached
