"""The published OpenAPI schema against what the gateway really sends, over real HTTP: every
route documented, no 422 the server never answers, a bearer scheme on /v1, and every real
body (each stream event too, each error) valid against the schema of its route and status.

Bodies are checked with ``jsonschema`` against the schema fragment from /openapi.json
itself, not against the pydantic models it was generated from, so what a client reads is
what is tested. ``jsonschema`` and ``openapi_spec_validator`` come with ``moto[server]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import best_match  # type: ignore[import-untyped]
from openapi_spec_validator import validate as validate_spec

from ember_platform.gateway import GatewayConfig

from .conftest import MODEL, Gateway

HELLO = [{"role": "user", "content": "Say something."}]
CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0},
    TEXT: {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0},
}
GENERATION = {"200", "400", "401", "402", "404", "413", "429", "500"}
DOCUMENTED_STATUSES = {
    (CHAT, "post"): GENERATION,
    (TEXT, "post"): GENERATION,
    ("/v1/models", "get"): {"200", "401"},
    ("/v1/usage", "get"): {"200", "400", "401"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/metrics", "get"): {"200"},
    ("/workers", "get"): {"200"},
}


def openapi(gw: Gateway) -> dict[str, Any]:
    resp = httpx.get(gw.base_url + "/openapi.json")
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def auth(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}"}


def conforms(doc: dict[str, Any], schema: dict[str, Any], body: Any, where: str) -> None:
    # The fragment's $refs ("#/components/schemas/...") point into the whole document, so
    # validate it inside a root that carries the components; jsonschema ignores the key.
    root = {"allOf": [schema], "components": doc["components"]}
    Draft202012Validator.check_schema(root)
    # best_match looks inside oneOf (a stream event is a chunk or an error) for the branch
    # that came closest, so the message names the field at fault.
    error = best_match(Draft202012Validator(root).iter_errors(body))
    if error is not None:
        at = "/".join(map(str, error.absolute_path))
        pytest.fail(
            f"{where}: the body does not match its schema at {at!r}: {error.message}\n{body}"
        )


def documented(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented"
    response: dict[str, Any] = responses[str(status)]
    return response


def check(doc: dict[str, Any], path: str, method: str, resp: httpx.Response) -> Any:
    """Asserts ``resp`` is a documented status and media type of the route and its JSON
    body matches that schema; returns the body."""
    content = documented(doc, path, method, resp.status_code)["content"]
    media = resp.headers["content-type"].split(";")[0]
    assert media in content, f"{method} {path} {resp.status_code} sent {media}, not documented"
    body = resp.json()
    conforms(doc, content[media]["schema"], body, f"{method} {path} {resp.status_code}")
    return body


def sse_events(resp: httpx.Response) -> list[Any]:
    lines = [line for line in resp.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_schema_is_valid_openapi_and_documents_every_route(gateway: Gateway) -> None:
    doc = openapi(gateway)
    validate_spec(doc)
    served = {
        (route.path, method.lower())
        for route in gateway.app.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert listed == served
    statuses = {
        (path, method): set(op["responses"])
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    assert statuses == DOCUMENTED_STATUSES
    # Validation errors are answered 400 with ErrorResponse; FastAPI's 422 must not show.
    assert not {"HTTPValidationError", "ValidationError"} & set(doc["components"]["schemas"])
    assert all("422" not in codes for codes in statuses.values())
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for (path, method), codes in statuses.items():
        for code in codes - {"200"}:
            if (path, code) != ("/readyz", "503"):  # readiness, not an error body
                schema = doc["paths"][path][method]["responses"][code]["content"]
                assert schema == {"application/json": {"schema": error_ref}}, (path, code)


def test_v1_routes_declare_bearer_auth_and_answer_401_as_documented(gateway: Gateway) -> None:
    doc = openapi(gateway)
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    with httpx.Client(base_url=gateway.base_url) as http:
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if not path.startswith("/v1/"):
                    assert "security" not in op, path
                    assert http.request(method, path).status_code == 200, path
                    continue
                assert op["security"] == [{"bearerAuth": []}], path
                for headers in ({}, {"Authorization": "Bearer ek_nothere_secret"}):
                    resp = http.request(method, path, json=BODIES.get(path), headers=headers)
                    assert resp.status_code == 401, (path, resp.text)
                    check(doc, path, method, resp)


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_generation_bodies_and_stream_events_match_the_schema(gateway: Gateway, path: str) -> None:
    doc = openapi(gateway)
    ok = documented(doc, path, "post", 200)
    with httpx.Client(base_url=gateway.base_url, headers=auth(gateway), timeout=60) as http:
        whole = check(doc, path, "post", http.post(path, json=BODIES[path]))
        assert whole["usage"]["completion_tokens"] >= 1

        event_schema = ok["content"]["text/event-stream"]["x-sse-data"]
        for options in (None, {"include_usage": True}):
            body = {**BODIES[path], "stream": True}
            if options:
                body["stream_options"] = options
            resp = http.post(path, json=body)
            assert resp.status_code == 200, resp.text
            assert resp.headers["content-type"].split(";")[0] == "text/event-stream"
            assert "X-Request-Id" in ok["headers"] and resp.headers["x-request-id"]
            events = sse_events(resp)
            assert len(events) >= 2
            for i, event in enumerate(events):
                conforms(doc, event_schema, event, f"{path} stream event {i}")
            assert all("error" not in e for e in events)
            last = events[-1]
            if options:  # the usage-only last chunk
                assert (
                    last["choices"] == []
                    and last["usage"]["completion_tokens"] == (whole["usage"]["completion_tokens"])
                )
            else:
                assert all("usage" not in e for e in events)


def test_models_usage_health_and_ready_match_the_schema(gateway: Gateway) -> None:
    doc = openapi(gateway)
    with httpx.Client(base_url=gateway.base_url, headers=auth(gateway), timeout=60) as http:
        assert http.post(CHAT, json=BODIES[CHAT]).status_code == 200
        models = check(doc, "/v1/models", "get", http.get("/v1/models"))
        assert [m["id"] for m in models["data"]] == [MODEL]
        usage = check(doc, "/v1/usage", "get", http.get("/v1/usage"))
        assert usage["data"][0]["requests"] == 1 and usage["period"] is None
        empty = check(doc, "/v1/usage", "get", http.get("/v1/usage?period=2001-01"))
        assert empty == {"object": "list", "period": "2001-01", "data": []}
        assert check(doc, "/healthz", "get", http.get("/healthz")) == {"status": "ok"}
        assert check(doc, "/readyz", "get", http.get("/readyz"))["status"] == "ready"
        metrics = http.get("/metrics")
        media = metrics.headers["content-type"].split(";")[0]
        assert media in documented(doc, "/metrics", "get", 200)["content"]
        assert "ember_requests_total" in metrics.text
        assert 'ember_workers{model="' in metrics.text
        (worker,) = check(doc, "/workers", "get", http.get("/workers"))["data"]
        assert worker["model"] == MODEL and worker["state"] == "READY"
        assert worker["private_bytes"] > 0 and worker["proportional_bytes"] > 0


HUGE = "x" * 2_000_000  # over the default 1 MiB body limit
ERRORS = [
    ("bad json", CHAT, b"{not json", 400),
    ("unknown field", CHAT, {**BODIES[CHAT], "wat": 1}, 400),
    ("wrong type", TEXT, {"model": MODEL, "prompt": 5}, 400),
    ("over the context", TEXT, {"model": MODEL, "prompt": "hello " * 5000}, 400),
    ("unknown model chat", CHAT, {**BODIES[CHAT], "model": "gpt-9"}, 404),
    ("unknown model text", TEXT, {**BODIES[TEXT], "model": "gpt-9"}, 404),
    ("oversized chat", CHAT, {**BODIES[CHAT], "messages": [{**HELLO[0], "content": HUGE}]}, 413),
    ("oversized text", TEXT, {**BODIES[TEXT], "prompt": HUGE}, 413),
]


@pytest.mark.parametrize(("what", "path", "body", "status"), ERRORS, ids=[e[0] for e in ERRORS])
def test_request_errors_match_the_schema_of_their_status(
    gateway: Gateway, what: str, path: str, body: Any, status: int
) -> None:
    doc = openapi(gateway)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**auth(gateway), "Content-Type": "application/json"}
    resp = httpx.post(gateway.base_url + path, content=raw, headers=headers, timeout=60)
    assert resp.status_code == status, resp.text
    check(doc, path, "post", resp)


def test_bad_usage_period_is_a_documented_400(gateway: Gateway) -> None:
    resp = httpx.get(gateway.base_url + "/v1/usage?period=2026-13", headers=auth(gateway))
    assert resp.status_code == 400, resp.text
    assert check(openapi(gateway), "/v1/usage", "get", resp)["error"]["param"] == "period"


def test_over_budget_is_a_documented_402(gateway: Gateway) -> None:
    gateway.billing.set_quota(gateway.tenant, spend_cap_micros=10)
    doc = openapi(gateway)
    with httpx.Client(base_url=gateway.base_url, headers=auth(gateway), timeout=60) as http:
        for path in (CHAT, TEXT):
            resp = http.post(path, json={**BODIES[path], "max_tokens": 50})
            assert resp.status_code == 402, resp.text
            assert check(doc, path, "post", resp)["error"]["code"] == "insufficient_quota"


def test_rate_limited_is_a_documented_429_with_retry_after(
    gateway_factory: Callable[..., Gateway],
) -> None:
    gw = gateway_factory(GatewayConfig(requests_per_minute_per_key=1))
    doc = openapi(gw)
    with httpx.Client(base_url=gw.base_url, headers=auth(gw), timeout=60) as http:
        assert http.post(CHAT, json=BODIES[CHAT]).status_code == 200
        for path in (CHAT, TEXT):
            resp = http.post(path, json=BODIES[path])
            assert resp.status_code == 429, resp.text
            check(doc, path, "post", resp)
            headers = documented(doc, path, "post", 429)["headers"]
            assert headers["Retry-After"]["schema"]["type"] == "integer"
            assert int(resp.headers["retry-after"]) >= 1


def test_a_stopped_engine_is_a_documented_500_and_503(gateway: Gateway) -> None:
    doc = openapi(gateway)
    gateway.service.close()
    with httpx.Client(base_url=gateway.base_url, headers=auth(gateway), timeout=60) as http:
        for path in (CHAT, TEXT):
            resp = http.post(path, json=BODIES[path])
            assert resp.status_code == 500, resp.text
            assert check(doc, path, "post", resp)["error"]["code"] == "engine_error"
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert check(doc, "/readyz", "get", ready) == {"status": "not ready", "models": [MODEL]}
