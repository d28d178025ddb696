"""A real `carpool serve` process on 127.0.0.1 (a free port chosen by the OS) for the server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from carpool.demo import demo_model_path

STARTUP_TIMEOUT_S = 240.0


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, api_key: str | None = None) -> None:
        """`args` go after `carpool serve`; without a model first, the random demo model is served as "demo"
        (whatever the package's default model is). `api_key` is passed as $CARPOOL_API_KEY and sent by
        `metrics()` and `headers`."""
        if not args or args[0].startswith("-"):
            args = (demo_model_path(), "--served-model-name", "demo", *args)
        cmd = [sys.executable, "-m", "carpool.entrypoints.cli", "serve", "--device", "cpu", "--port", "0", *args]
        self.api_key = api_key
        env = {**os.environ, **(env or {}), **({"CARPOOL_API_KEY": api_key} if api_key else {})}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: the log can never fill it up
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"on (http://\S+)", line)
        if match is None:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}\n{self.log()}")
        self.url = match.group(1)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server did not become healthy:\n{self.log()}")
            time.sleep(0.05)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels, e.g. {"carpool:num_requests_running": 0.0}."""
        response = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10)
        response.raise_for_status()
        text = response.text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out.setdefault(name.split("{", 1)[0], float(value))
        return out

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (killed and -9 if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode
