"""The defects a user probe of the running server found (issue 18), each pinned through raw HTTP
on the real server: documented /health, 400/415/SSE in the spec, 405 with `Allow`, non-finite
floats refused as 422, an oversized regex refused before generation, the given max_new_tokens
echoed, and /docs served with no CDN."""
from __future__ import annotations

import re

import httpx
import pytest

V = "Input validation error: "


def raw_post(base: str, path: str, body: str) -> httpx.Response:
    return httpx.post(base + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)


def test_health_is_an_empty_200_and_documented_so(server):
    r = httpx.get(server.base_url + "/health", timeout=60)
    assert (r.status_code, r.content, r.headers.get("content-type")) == (200, b"", None)
    spec = httpx.get(server.base_url + "/api-doc/openapi.json", timeout=60).json()["paths"]["/health"]["get"]
    assert "content" not in spec["responses"]["200"]
    unhealthy = spec["responses"]["503"]["content"]["application/json"]["schema"]
    assert unhealthy == {"$ref": "#/components/schemas/HealthError"}


def test_spec_documents_middleware_statuses_and_event_streams(server):
    spec = httpx.get(server.base_url + "/api-doc/openapi.json", timeout=60).json()
    for path in ("/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/invocations"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "413", "415", "422", "424", "429", "503"} <= set(responses), path
        assert responses["415"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert set(spec["paths"]["/generate_stream"]["post"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert set(spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]) == {
        "text/event-stream", "application/json"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert httpx.get(server.base_url + "/metrics", timeout=60).headers["content-type"].startswith("text/plain")


def test_405_names_the_allowed_methods(server):
    r = httpx.get(server.base_url + "/generate", timeout=60)
    assert (r.status_code, r.headers["allow"], r.json()) == (
        405, "POST", {"error": "Method Not Allowed", "error_type": "method_not_allowed"})
    r = httpx.post(server.base_url + "/info", timeout=60)
    assert (r.status_code, r.headers["allow"]) == (405, "GET")


NOT_FINITE = "Failed to deserialize the JSON body into the target type: parameters.{}: Input should be a finite number"


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "frequency_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_floats_are_422_before_generation(server, field, literal):
    r = raw_post(server.base_url, "/generate", f'{{"inputs": "x", "parameters": {{"{field}": {literal}}}}}')
    assert (r.status_code, r.json()) == (422, {"error": NOT_FINITE.format(field), "error_type": "validation"})


def test_non_finite_floats_on_openai_routes(server):
    r = raw_post(server.base_url, "/v1/chat/completions",
                 '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert r.status_code == 422 and r.json()["error"].endswith("temperature: Input should be a finite number")
    r = raw_post(server.base_url, "/v1/completions", '{"prompt": "x", "repetition_penalty": Infinity}')
    assert r.status_code == 422 and r.json()["error"].endswith("repetition_penalty: Input should be a finite number")


def test_an_oversized_regex_is_refused_with_the_compilers_reason(server):
    body = {"inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex", "value": "(a{1000}){1000}"}}}
    r = httpx.post(server.base_url + "/generate", json=body, timeout=60)
    assert (r.status_code, r.json()) == (422, {
        "error": V + "grammar is not valid: lexer error: too many expressions constructed", "error_type": "validation"})
    ok = {"inputs": "x", "parameters": {"max_new_tokens": 3, "grammar": {"type": "regex", "value": "(a{3}){2}"}}}
    r = httpx.post(server.base_url + "/generate", json=ok, timeout=60)
    assert r.status_code == 200 and re.fullmatch("a{0,6}", r.json()["generated_text"])


def test_too_many_new_tokens_echo_the_given_value(server):
    r = httpx.post(server.base_url + "/generate", json={"inputs": "def add(a, b):", "parameters": {"max_new_tokens": 5000}},
                   timeout=60)
    assert (r.status_code, r.json()["error"]) == (422, V + "`inputs` tokens + `max_new_tokens` must be <= 1024. "
                                                        "Given: 8 `inputs` tokens and 5000 `max_new_tokens`")


def test_docs_work_offline(server):
    page = httpx.get(server.base_url + "/docs", timeout=60)
    assert page.status_code == 200
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert "/docs/assets/swagger-ui-bundle.js" in assets and "/docs/assets/swagger-ui.css" in assets
    assert not re.search(r"https?://", page.text), "the page must load nothing from the internet"
    for asset in assets:
        r = httpx.get(server.base_url + asset, timeout=60)
        assert r.status_code == 200 and r.content, asset
    assert "SwaggerUIBundle" in httpx.get(server.base_url + "/docs/assets/swagger-ui-bundle.js", timeout=60).text
