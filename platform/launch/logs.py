"""Stream the rank-0 pod's log lines to the launcher's output and keep the last lines for failure reports."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, TextIO

logger = logging.getLogger(__name__)


class LogFollower:
    """Follow one container log in a thread; `tail` contains the last `keep` lines.

    NOTE: a connection that drops mid-run is not resumed (the kubelet offers no
    byte offset, only sinceSeconds, which would repeat or skip lines); the
    launcher fetches the final tail when the job ends instead.
    """

    def __init__(self, api_client: Any, namespace: str, pod: str, container: str, out: TextIO | None, keep: int = 50) -> None:
        self._api_client = api_client
        self.namespace = namespace
        self.pod = pod
        self.container = container
        self._out = out
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.lines_seen = 0
        self._thread = threading.Thread(target=self._run, name=f"logs-{pod}", daemon=True)

    def start(self) -> "LogFollower":
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _emit(self, line: str) -> None:
        self.tail.append(line)
        self.lines_seen += 1
        if self._out is not None:
            self._out.write(f"[{self.pod}] {line}\n")
            self._out.flush()

    def _run(self) -> None:
        from kubernetes import client, watch

        core = client.CoreV1Api(self._api_client)
        try:
            for line in watch.Watch().stream(
                core.read_namespaced_pod_log,
                name=self.pod,
                namespace=self.namespace,
                container=self.container,
                _request_timeout=(10, 3600),
            ):
                self._emit(line)
        except Exception as error:  # noqa: BLE001  # a lost log stream must not stop the launcher
            logger.info("log stream of pod %s ended: %s: %s", self.pod, type(error).__name__, error)

    def fetch_tail(self) -> None:
        """Read the last lines once (for a pod whose log was never followed or was cut off)."""
        from kubernetes import client

        core = client.CoreV1Api(self._api_client)
        try:
            text = core.read_namespaced_pod_log(
                self.pod, self.namespace, container=self.container, tail_lines=self.tail.maxlen, _request_timeout=30
            )
        except Exception as error:  # noqa: BLE001  # the log is evidence only
            logger.info("cannot read the log of pod %s: %s", self.pod, error)
            return
        self.tail.clear()
        self.tail.extend(text.splitlines())
