"""schemathesis drives every operation of our OpenAPI document: no 5xx, responses match the schema.

The case count is kept small for the suite; GS_FUZZ_EXAMPLES=500 runs a larger campaign.
"""
from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_TOKEN

EXAMPLES = int(os.environ.get("GS_FUZZ_EXAMPLES", "15"))


def load_schema():
    from api.app import app  # settings come from tests/conftest.py's private embedded default

    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = load_schema()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_responses_match_the_schema(client, case):  # client: migrated database
    # Schema-valid specs may still be refused by the engine (422 invalid_spec): that is a 4xx by
    # design, so "positive data acceptance" is not one of the checks.
    case.call_and_validate(
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
