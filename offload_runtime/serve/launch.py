"""Run the server as a child process and wait until it serves: for tests, benchmarks and notebooks.

    with launched(["--model", "demo", "--device", "cpu"], Path("serve.log")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")

It listens on a free port (--port 0; the log's first line says which), and the block's end always stops it:
SIGTERM, then SIGKILL if it has not gone within 20 s.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

READY = re.compile(r"serving \S+ on (http://\S+)/v1")


@dataclass
class ServerProcess:
    url: str  # http://host:port; the API is under /v1
    log: Path  # the child's stdout and stderr
    process: subprocess.Popen

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 503 while the engine is not running still has a body
            return json.load(e)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def launched(args: Sequence[str], log: Path, *, timeout: float = 180.0,
             env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """`python -m offload_runtime.serve --port 0 ARGS`, serving until the block ends."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "offload_runtime.serve", "--port", "0", *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace")
            found = READY.search(text)
            if found and "Application startup complete" in text:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s:\n{text[-3000:]}")
            time.sleep(0.1)
        yield ServerProcess(found.group(1), log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
