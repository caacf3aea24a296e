"""An HTTP server process (vLLM's OpenAI server, ``kvstrata serve``) for tests and benchmarks.

Contract: the process leads its own session (``start_new_session``), so
:meth:`ServerProcess.stop` signals only what it started; output goes to
``log_path`` (appended); ready means ``GET /health`` answered 200. The port is
the one after ``--port`` in ``argv`` (pick it with
:func:`kvstrata.testing.services.free_ports`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

#: what an offline engine earlier in this process may have set (kvstrata.offline.runner.make_llm:
#: single-process mode, a thread binding "all" multiprocess mode cannot parse, a KV cache size)
OFFLINE_ENGINE_ENV = (
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_KVCACHE_SPACE",
)


def server_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a vLLM server: vLLM's defaults where an offline engine set
    its own (:data:`OFFLINE_ENGINE_ENV`), plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENGINE_ENV}
    return env | overrides


class ServerProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name, self.argv, self.env, self.log_path = name, argv, env, Path(log_path)
        self.port = int(argv[argv.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.ready_s = 0.0  # seconds from launch to the first healthy answer

    def launch(self) -> None:
        """Start the process; return at once (see :meth:`wait_ready`)."""
        self.started = time.monotonic()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 900) -> None:
        """Until ``/health`` answers 200; RuntimeError (with the log's tail) if the process
        exits or ``timeout`` seconds pass since the launch."""
        import httpx

        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f} s:\n{self.tail()}")

    def start(self, timeout: float = 900) -> None:
        self.launch()
        self.wait_ready(timeout)

    def stop(self) -> None:
        """SIGTERM (vLLM's server stops its engine core and workers), SIGKILL to the process
        group after 60 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
            self.proc.wait(10)

    def tail(self, n: int = 4000) -> str:
        """The log's error lines (at most 20), then its last ``n`` characters."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        lines = text.splitlines()
        errors = [line for line in lines if "Error" in line and "ulimit" not in line][:20]
        return "\n".join(errors) + "\n...\n" + text[-n:]
