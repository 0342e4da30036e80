"""A Kubernetes API stand-in on 127.0.0.1 for tests: kmock's in-memory emulator plus shims.

No real API server can run on the test machines, so the launcher and the
chart are tested over HTTP against kmock 0.8 (`kmock.KubernetesEmulator`)
served from a background event loop. kmock needs these shims to behave like
an API server for the official client 30.1.0 and kubectl:

* the client sends `?watch=True`, kmock only knows `watch=true`;
* kmock stores no resourceVersion, uid or creationTimestamp, so they are stamped
  on every create and update here (resourceVersion from one global counter);
* kmock does not map PUT, so a PUT is served as a merge PATCH;
* kmock reports Kubernetes v1.26; it reports v1.37, the version the schemas here are for;
* kmock's core discovery names the group version "/v1", which kubectl rejects; it is served as "v1";
* pod logs (`pods/NAME/log`) come from `set_log_lines`, streamed while `follow=true`
  until `end_log` is called;
* `drop_watches()` cuts every open watch connection, like an API server restart.

Label and field selectors and `timeoutSeconds` are still ignored by kmock:
clients must filter by name and labels themselves and pass `_request_timeout`.
kmock is a test dependency; this module imports it only when a stand-in starts.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import threading
import uuid
from typing import Any

# Custom resources the platform creates or reads: (group, version, plural, kind, namespaced).
CUSTOM_RESOURCES = [
    ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", True),
    ("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", "ClusterTrainingRuntime", False),
    ("trainer.kubeflow.org", "v1alpha1", "trainingruntimes", "TrainingRuntime", True),
    ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", True),
    ("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet", True),
    ("kueue.x-k8s.io", "v1beta2", "localqueues", "LocalQueue", True),
    ("kueue.x-k8s.io", "v1beta2", "workloads", "Workload", True),
]


class KubeStandIn:
    """The emulator on 127.0.0.1 (a free port), started by `start()` and stopped by `stop()`.

    Use as a context manager. `url` is the API server URL for
    `kubernetes.client.Configuration.host` or a kubeconfig.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._watch_tasks: set[asyncio.Task] = set()
        self._logs: dict[tuple[str, str], list[str]] = {}
        self._logs_ended: set[tuple[str, str]] = set()
        self._versions = itertools.count(1)
        self.watch_queries: list[dict[str, str]] = []
        """Query parameters of every watch request, in arrival order (for resumption checks)."""
        self.port = 0
        self.emulator: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "KubeStandIn":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "KubeStandIn":
        self._thread = threading.Thread(target=self._serve, name="kube-standin", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the kmock Kubernetes stand-in did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the kmock Kubernetes stand-in failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def drop_watches(self) -> int:
        """Cut every open watch connection; return how many were cut."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._cancel_watches(), self._loop)
        return future.result(10)

    def set_log_lines(self, namespace: str, pod: str, lines: list[str]) -> None:
        """Append lines to the log of `pod` (served on pods/NAME/log)."""
        self._logs.setdefault((namespace, pod), []).extend(lines)

    def end_log(self, namespace: str, pod: str) -> None:
        """Mark the log of `pod` complete, so a following reader sees the end of the stream."""
        self._logs.setdefault((namespace, pod), [])
        self._logs_ended.add((namespace, pod))

    def api_client(self) -> Any:
        """Return an official-client ApiClient pointing at the stand-in."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def write_kubeconfig(self, path: str) -> str:
        """Write a kubeconfig for kubectl that points at the stand-in; return the path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": "default"}}],
            "current-context": "standin",
        }
        with open(path, "w") as handle:
            json.dump(config, handle)
        return path

    # The event loop thread.

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # noqa: BLE001  # reported to start() instead of dying silently
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        import kmock

        emulator = _build_emulator_class(kmock)(standin=self)
        emulator.resources.load_bundled()
        for group, version, plural, kind, namespaced in CUSTOM_RESOURCES:
            emulator.resources[f"{group}/{version}/{plural}"] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                verbs={"create", "get", "list", "watch", "patch", "update", "delete"},
                subresources={"status"},
            )
        self.emulator = emulator
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            self.port = server.port
            self._ready.set()
            await self._stop.wait()
            await self._cancel_watches()

    async def _cancel_watches(self) -> int:
        tasks = [task for task in self._watch_tasks if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    def _stamp(self, data: Any, create: bool) -> None:
        if not isinstance(data, dict):
            return
        metadata = data.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            return
        metadata["resourceVersion"] = str(next(self._versions))
        if create:
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
            metadata.setdefault("generation", 1)

    async def _stream_log(self, namespace: str, pod: str, follow: bool) -> Any:
        key = (namespace, pod)
        sent = 0
        while True:
            lines = self._logs.get(key, [])
            while sent < len(lines):
                yield (lines[sent] + "\n").encode()
                sent += 1
            if not follow or key in self._logs_ended:
                return
            await asyncio.sleep(0.05)


def _build_emulator_class(kmock: Any) -> type:
    """Subclass kmock's emulator with the shims listed in the module docstring."""
    import aiohttp.web

    class ShimmedEmulator(kmock.KubernetesEmulator):
        def __init__(self, standin: KubeStandIn) -> None:
            super().__init__()
            self._standin = standin

        async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
            url = raw_request.rel_url
            if url.query.get("watch") in ("True", "1"):
                raw_request = raw_request.clone(rel_url=url.update_query(watch="true"))
            if raw_request.method == "PUT":
                raw_request = raw_request.clone(method="PATCH")
            parts = raw_request.rel_url.path.strip("/").split("/")
            # /api/v1/namespaces/NS/pods/NAME/log
            if len(parts) == 7 and parts[:2] == ["api", "v1"] and parts[4] == "pods" and parts[6] == "log":
                return await self._serve_log(raw_request, parts[3], parts[5])
            if raw_request.rel_url.query.get("watch") == "true":
                self._standin.watch_queries.append(dict(raw_request.rel_url.query))
                task = asyncio.current_task()
                assert task is not None
                self._standin._watch_tasks.add(task)
                try:
                    return await super().__call__(raw_request)
                finally:
                    self._standin._watch_tasks.discard(task)
            return await super().__call__(raw_request)

        async def _serve_server_version(self, request: Any) -> Any:
            # kmock reports v1.26; the chart requires >= 1.29, and the schemas here are for 1.37.
            payload = dict(await super()._serve_server_version(request))
            payload.update(major="1", minor="37", gitVersion="v1.37.0-kmock")
            return payload

        async def _serve_version(self, request: Any) -> Any:
            payload = await super()._serve_version(request)
            # kmock names the core group version "/v1"; kubectl's discovery needs "v1".
            if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
                payload["groupVersion"] = payload["groupVersion"][1:]
            return payload

        async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
            if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                self._standin._stamp(request.data, create=request.action == kmock.action.CREATE)
            return await super()._handle(request)

        async def _serve_log(self, raw_request: aiohttp.web.BaseRequest, namespace: str, pod: str) -> Any:
            follow = raw_request.rel_url.query.get("follow") in ("true", "True", "1")
            response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
            await response.prepare(raw_request)
            async for chunk in self._standin._stream_log(namespace, pod, follow):
                await response.write(chunk)
            await response.write_eof()
            return response

    return ShimmedEmulator
