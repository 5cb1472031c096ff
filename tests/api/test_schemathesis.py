"""schemathesis over the OpenAPI spec, in-process (ASGI) against the demo model's real engine:
every route answers only statuses, content types and bodies its spec documents.

Bounded: a few examples per operation and a small max_total_tokens keep it under a minute on 2
cores. The deliberate exceptions (README, "schemathesis") are the checks not run here:
`positive_data_acceptance` (a body the schema allows can still break TGI's value rules, e.g.
`top_p: 1.0`: TGI documents those as 422) and `max_response_time`.
"""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.api.conftest import make_engine  # noqa: E402

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 5  # per operation and generation mode


@pytest.fixture(scope="module")
def app():
    from textgen.api.server import create_app
    from textgen.api.state import ServerSettings
    from textgen.demo import DEMO_MODEL_PATH

    engine = make_engine(DEMO_MODEL_PATH, max_total_tokens=48, max_concurrent_requests=8)
    yield create_app(engine, ServerSettings(hostname="127.0.0.1", keep_alive_s=1.0))
    engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/api-doc/openapi.json", app)


def operations(api_schema) -> list:
    return [result.ok() for result in api_schema.get_all_operations()]


def test_every_route_answers_as_documented(api_schema):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     response_schema_conformance, status_code_conformance, unsupported_method)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection, unsupported_method]
    failures = {}
    ops = operations(api_schema)
    assert len(ops) >= 12, [op.label for op in ops]
    for op, mode in [(op, mode) for op in ops for mode in GenerationMode]:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(checks=checks)

        try:
            run()
        except Unsatisfiable:  # no parameters or body to make invalid (GET /info, raw-body /invocations)
            assert mode is GenerationMode.NEGATIVE, op.label
        except Exception as exc:  # noqa: BLE001 - collected so that one report names every route
            failures[f"{op.label} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
