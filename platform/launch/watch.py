"""Watch one custom object and survive dropped connections, timeouts and expired resource versions.

A background thread runs the watch and hands every new state of the object to
a queue. Each watch request starts from the last resourceVersion seen, so a
reconnect neither misses nor replays changes on a real API server. After
`410 Gone` (the version was compacted away) it reads the object afresh.
Events for other objects are dropped here, because some API servers (and the
test stand-in) ignore field selectors.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

logger = logging.getLogger(__name__)

GONE = object()
"""Queued when the object was deleted."""


class ObjectWatch:
    """Watch `name` of a namespaced custom resource; `changes` receives object dicts (or GONE).

    Args:
        api_client: a kubernetes.client.ApiClient.
        group, version, plural, namespace, name: the watched object.
        timeout_s: server-side timeout of one watch request; the client read
            timeout is 10 s longer, so a silent connection is replaced too.
        resource_version: the version to start from (from the create response).
    """

    def __init__(
        self,
        api_client: Any,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        timeout_s: float = 60.0,
        resource_version: str | None = None,
    ) -> None:
        self._api_client = api_client
        self._resource = (group, version, namespace, plural)
        self._name = name
        self._timeout_s = timeout_s
        self.resource_version = resource_version
        self.reconnects = 0
        self.changes: queue.Queue[Any] = queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> "ObjectWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        from kubernetes import client, watch

        api = client.CustomObjectsApi(self._api_client)
        group, version, namespace, plural = self._resource
        delay = 0.5
        while not self._stopped.is_set():
            stream = watch.Watch()
            try:
                if self.resource_version is None:
                    self._refresh(api)
                kwargs: dict[str, Any] = {
                    "field_selector": f"metadata.name={self._name}",
                    "timeout_seconds": int(self._timeout_s),
                    "_request_timeout": (10, self._timeout_s + 10),
                    "allow_watch_bookmarks": True,
                }
                if self.resource_version:
                    kwargs["resource_version"] = self.resource_version
                for event in stream.stream(api.list_namespaced_custom_object, group, version, namespace, plural, **kwargs):
                    if self._stopped.is_set():
                        break
                    self._handle(event)
                    delay = 0.5
            except client.ApiException as error:
                if error.status == 410:
                    logger.info("watch of %s: resourceVersion %s expired, reading the object again", self._name, self.resource_version)
                    self.resource_version = None
                    continue
                logger.warning("watch of %s failed with HTTP %s (%s); reconnecting in %.1f s", self._name, error.status, error.reason, delay)
            except Exception as error:  # noqa: BLE001  # urllib3 connection and read errors of many types
                if self._stopped.is_set():
                    break
                logger.info("watch of %s dropped (%s: %s); resuming from resourceVersion %s", self._name, type(error).__name__, error, self.resource_version)
            finally:
                stream.stop()
            if self._stopped.is_set():
                break
            self.reconnects += 1
            self._stopped.wait(delay)
            delay = min(delay * 2, 10.0)

    def _refresh(self, api: Any) -> None:
        from kubernetes import client

        group, version, namespace, plural = self._resource
        try:
            obj = api.get_namespaced_custom_object(group, version, namespace, plural, self._name, _request_timeout=30)
        except client.ApiException as error:
            if error.status == 404:
                self.changes.put(GONE)
                self._stopped.set()
                return
            raise
        self.resource_version = obj.get("metadata", {}).get("resourceVersion") or ""
        self.changes.put(obj)

    def _handle(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        metadata = obj.get("metadata") or {}
        if event.get("type") == "BOOKMARK":
            self.resource_version = metadata.get("resourceVersion") or self.resource_version
            return
        if metadata.get("name") != self._name:
            return
        self.resource_version = metadata.get("resourceVersion") or self.resource_version
        if event.get("type") == "DELETED":
            self.changes.put(GONE)
            return
        self.changes.put(obj)
