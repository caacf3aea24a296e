"""``/lookup`` on the exporter's HTTP server: the routing hint of :mod:`kvstrata.lookup` over HTTP.

The exporter (:mod:`kvstrata.telemetry.exporter`) serves :func:`make_app` instead of
prometheus_client's bare app: ``/metrics`` (and every other path) goes to
Prometheus as before, ``/lookup`` here. Standard library only (wsgiref, via
prometheus_client's threading WSGI server): no new server dependency.

Requests::

    GET  /lookup?tokens=1,2,3[&cache_salt=S][&skip_tokens=N][&<param>=<value>...]
    POST /lookup   {"tokens": [1, 2, 3], "cache_salt": "S", "skip_tokens": N,
                    "kv_transfer_params": {"tier": "shared", "budget_ms": 200}}

Other GET parameters become ``kv_transfer_params`` (the request's hints), as
vLLM would pass them to the connector. The answer is
:meth:`LookupReport.to_dict` as JSON (200); a malformed request is 400, an
exporter without an orchestrator of its telemetry in this process 404.

The orchestrator is found by its telemetry among this process's shared
orchestrators (the vLLM connector's), so the exporter needs no reference to it.
"""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

from kvstrata import lookup as lk

MAX_BODY_BYTES = 16 << 20  # a 1M-token prompt as JSON numbers fits


class BadRequest(ValueError):
    pass


def make_app(registry, telemetry):
    """A WSGI app: ``/lookup`` answered for the orchestrator
    of ``telemetry``, the rest by Prometheus."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO", "").rstrip("/") != "/lookup":
            return metrics(environ, start_response)
        try:
            status, body = "200 OK", answer(telemetry, _request(environ))
        except BadRequest as exc:
            status, body = "400 Bad Request", {"error": str(exc)}
        except LookupError as exc:
            status, body = "404 Not Found", {"error": str(exc)}
        data = json.dumps(body).encode()
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        )
        return [data]

    return app


def start_server(addr: str, port: int, registry, telemetry):
    """Serve :func:`make_app` on ``addr:port`` from a daemon thread (as prometheus_client's
    ``start_wsgi_server``); returns the server (``server_port``, ``shutdown()``)."""

    class Server(ThreadingWSGIServer):
        pass

    Server.address_family, addr = _get_best_family(addr, port)
    httpd = make_server(
        addr, port, make_app(registry, telemetry), Server, handler_class=_SilentHandler
    )
    threading.Thread(target=httpd.serve_forever, name="kvstrata-exporter", daemon=True).start()
    return httpd


def answer(telemetry, request: dict) -> dict:
    """The lookup report of one parsed request, for the orchestrator of ``telemetry``."""
    from kvstrata.orchestrator import shared_orchestrators

    orch = next((o for o in shared_orchestrators() if o.telemetry is telemetry), None)
    if orch is None:
        raise LookupError("no orchestrator in this process")
    ctx = lk.context(request.get("cache_salt"), request.get("kv_transfer_params"), orch.model.name)
    report = lk.lookup(orch, request["tokens"], ctx, int(request.get("skip_tokens") or 0))
    return report.to_dict()


def _request(environ) -> dict:
    """The request's fields, from a JSON body (POST) or the query string (GET)."""
    if environ.get("REQUEST_METHOD") == "POST":
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"body over {MAX_BODY_BYTES} bytes")
        try:
            request = json.loads(environ["wsgi.input"].read(length) or b"{}")
        except ValueError as exc:
            raise BadRequest(f"body is not JSON: {exc}") from None
        if not isinstance(request, dict):
            raise BadRequest("body must be a JSON object")
    else:
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        request = {
            "tokens": query.pop("tokens", ""),
            "cache_salt": query.pop("cache_salt", None),
            "skip_tokens": query.pop("skip_tokens", 0),
            "kv_transfer_params": query,
        }
        try:
            request["tokens"] = [int(t) for t in request["tokens"].split(",") if t.strip()]
        except ValueError:
            raise BadRequest("tokens must be comma-separated integers") from None
    tokens = request.get("tokens")
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, int) and t >= 0 for t in tokens)
    ):
        raise BadRequest("tokens must be a non-empty list of token ids")
    params = request.get("kv_transfer_params") or {}
    if not isinstance(params, dict):
        raise BadRequest("kv_transfer_params must be an object")
    try:
        request["skip_tokens"] = max(int(request.get("skip_tokens") or 0), 0)
    except (TypeError, ValueError):
        raise BadRequest("skip_tokens must be an integer") from None
    return request
