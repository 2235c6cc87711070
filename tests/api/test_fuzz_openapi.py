"""schemathesis drives every operation of our OpenAPI document: no 5xx, responses match the schema.

Twice: in-process on the embedded default (SQLite), and against a real API process on PostgreSQL, which
refuses what SQLite stores (NUL in text, integers past 32 bits). The case count is kept small for the
suite; GS_FUZZ_EXAMPLES=500 runs a larger campaign.
"""
from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_TOKEN, POSTGRES_URL, Stack, scratch_postgres

EXAMPLES = int(os.environ.get("GS_FUZZ_EXAMPLES", "15"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def load_schema():
    from api.app import app  # settings come from tests/conftest.py's private embedded default

    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = load_schema()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(client, case):  # client: migrated database
    # Schema-valid specs may still be refused by the engine (422 invalid_spec): that is a 4xx by
    # design, so "positive data acceptance" is not one of the checks.
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)


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
    case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, checks=CHECKS)
