"""Getting an orchestrator's metrics out of its process: a Prometheus endpoint and snapshot files.

One :class:`TelemetryService` per :class:`~kvstrata.telemetry.metrics.Telemetry`
(so per orchestrator) per process, started by whoever owns the orchestrator
(the vLLM connector) from the ``telemetry:`` section of the configuration:

* ``prometheus_port``: an HTTP exporter (``/metrics``, and ``/lookup``: the
  routing hint of :mod:`kvstrata.telemetry.lookup_http`) on ``prometheus_addr``.
  Every sample carries ``role`` (``scheduler``, ``worker``, or
  ``scheduler+worker`` when vLLM runs both in one process and they share one
  orchestrator) and ``pid``, so the series of vLLM's engine-core and worker
  processes stay apart; sum over them (``sum without (pid, role)``) for
  totals. If the port is taken -- the other process of the same engine got
  there first -- the next free one of the following 16 is used and logged.
  ``0`` binds any free port.
* ``snapshot_path``: every :data:`SNAPSHOT_EVERY_S` seconds and at exit the
  samples are written there (:meth:`Telemetry.save_snapshot`); ``{role}`` and
  ``{pid}`` in the path are replaced, so processes need not share one file.

The environment overrides the file, so a process that is not a vLLM server
(an offline ``LLM``, a script using the orchestrator) can be given an
exporter without editing the YAML: ``KVSTRATA_TELEMETRY_PROMETHEUS_PORT``
(``0``: any free port; ``off``/empty: none), ``KVSTRATA_TELEMETRY_PROMETHEUS_ADDR``,
``KVSTRATA_TELEMETRY_SNAPSHOT_PATH`` (:func:`settings`). A value that does not
parse is logged and ignored: metrics never keep an engine from starting.
A vLLM server needs none of this: its ``/metrics`` carries kvstrata's families.

Threads: the exporter serves from prometheus_client's daemon thread; snapshots
are written from one daemon thread per service. Neither touches the
orchestrator, only its registry (which is thread-safe).
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from kvstrata.telemetry import lookup_http
from kvstrata.telemetry.metrics import Telemetry

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 10.0
PORT_ATTEMPTS = 16

_SERVICES: dict[int, TelemetryService] = {}  # id(telemetry) -> its service
_LOCK = threading.Lock()


class _ProcessLabels(Collector):
    """The telemetry's registry, each sample labelled with this process's role and pid."""

    def __init__(self, service: TelemetryService):
        self.service = service

    def collect(self):
        extra = {"role": self.service.role, "pid": str(os.getpid())}
        for family in self.service.telemetry.registry.collect():
            family.samples = [s._replace(labels={**s.labels, **extra}) for s in family.samples]
            yield family


@dataclass
class TelemetryService:
    telemetry: Telemetry
    snapshot_path: str | None = None
    roles: set[str] = field(default_factory=set)
    url: str | None = None  # the exporter's /metrics, once started
    _server: object = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def role(self) -> str:
        return "+".join(sorted(self.roles)) or "process"  # a process that is not a vLLM role

    def start_exporter(self, addr: str, port: int) -> str:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_ProcessLabels(self))
        last: OSError | None = None
        for candidate in [0] if port == 0 else range(port, min(port + PORT_ATTEMPTS, 65536)):
            try:
                # /metrics as prometheus_client serves it, plus /lookup (the routing hint)
                self._server = lookup_http.start_server(addr, candidate, registry, self.telemetry)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                last = exc
        else:
            raise OSError(
                f"kvstrata exporter: ports {port}..{port + PORT_ATTEMPTS - 1} on {addr} are taken"
            ) from last
        bound = self._server.server_port
        host = f"[{addr}]" if ":" in addr else addr
        self.url = f"http://{host}:{bound}/metrics"
        if port and bound != port:
            log.info("kvstrata exporter: port %d taken, serving on %d", port, bound)
        return self.url

    def snapshot_file(self) -> Path | None:
        if not self.snapshot_path:
            return None
        return Path(
            self.snapshot_path.replace("{role}", self.role).replace("{pid}", str(os.getpid()))
        )

    def save_snapshot(self) -> Path | None:
        path = self.snapshot_file()
        if path is None:
            return None
        try:
            return self.telemetry.save_snapshot(
                path, role=self.role, **({"url": self.url} if self.url else {})
            )
        except OSError as exc:  # telemetry never takes the engine down
            log.warning("kvstrata: cannot write snapshot %s: %s", path, exc)
            return None

    def _snapshots(self) -> None:
        while not self._stop.wait(SNAPSHOT_EVERY_S):
            self.save_snapshot()

    def stop(self) -> None:
        """Write a last snapshot and stop the exporter."""
        self._stop.set()
        self.save_snapshot()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


ENV_PREFIX = "KVSTRATA_TELEMETRY_"


def settings(config=None, environ=None):
    """``config`` (a ``TelemetryConfig``; None: the defaults) with the environment's overrides."""
    from kvstrata.config import TelemetryConfig

    environ = os.environ if environ is None else environ
    out = config if config is not None else TelemetryConfig()
    port = environ.get(f"{ENV_PREFIX}PROMETHEUS_PORT")
    if port is not None:
        text = port.strip().lower()
        if text in ("", "off", "none"):
            out = out.model_copy(update={"prometheus_port": None})
        elif text.isdigit() and int(text) <= 65535:
            out = out.model_copy(update={"prometheus_port": int(text)})
        else:
            log.warning("kvstrata: ignoring %sPROMETHEUS_PORT=%.20r (not a port)", ENV_PREFIX, port)
    addr = environ.get(f"{ENV_PREFIX}PROMETHEUS_ADDR")
    if addr:
        out = out.model_copy(update={"prometheus_addr": addr.strip()[:255]})
    path = environ.get(f"{ENV_PREFIX}SNAPSHOT_PATH")
    if path is not None:
        out = out.model_copy(update={"snapshot_path": path.strip() or None})
    return out


def requested_by_env(environ=None) -> bool:
    """Does the environment ask for an exporter or snapshots (``KVSTRATA_TELEMETRY_*`` set)?"""
    environ = os.environ if environ is None else environ
    return any(k.startswith(ENV_PREFIX) and environ[k].strip() for k in environ)


def serve(telemetry: Telemetry, config, role: str) -> TelemetryService | None:
    """Start (once per telemetry) what ``config`` (a ``TelemetryConfig``, None: the defaults) and
    the environment (:func:`settings`) ask for; None if nothing.

    A second role sharing the same telemetry joins the running service (its
    ``role`` label becomes ``scheduler+worker``).
    """
    config = settings(config)
    if config.prometheus_port is None and not config.snapshot_path:
        return None
    with _LOCK:
        service = _SERVICES.get(id(telemetry))
        if service is None:
            service = _SERVICES[id(telemetry)] = TelemetryService(telemetry, config.snapshot_path)
            service.roles.update({role} - {""})
            if config.prometheus_port is not None:
                try:
                    url = service.start_exporter(config.prometheus_addr, config.prometheus_port)
                    log.info("kvstrata metrics (%s, pid %d): %s", service.role, os.getpid(), url)
                except OSError as exc:  # metrics never keep the engine from starting
                    log.warning("kvstrata: no Prometheus exporter: %s", exc)
            if config.snapshot_path:
                threading.Thread(
                    target=service._snapshots, name="kvstrata-snapshots", daemon=True
                ).start()
        else:
            service.roles.update({role} - {""})
        return service


def services() -> list[TelemetryService]:
    """This process's running services."""
    with _LOCK:
        return list(_SERVICES.values())


def save_snapshots() -> list[Path]:
    """Write every service's snapshot now (tests, shutdown)."""
    return [p for s in services() if (p := s.save_snapshot()) is not None]


def stop(telemetry: Telemetry) -> None:
    """Stop the service of one telemetry (last snapshot written), if it has one."""
    with _LOCK:
        service = _SERVICES.pop(id(telemetry), None)
    if service is not None:
        service.stop()


def stop_all() -> None:
    with _LOCK:
        running = list(_SERVICES.values())
        _SERVICES.clear()
    for service in running:
        service.stop()


atexit.register(stop_all)
