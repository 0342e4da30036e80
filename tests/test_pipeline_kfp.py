"""The Kubeflow pipeline: compile to IR, submit through kfp.Client, and run with kfp's local runner.

`bagel submit` is tested up to the HTTP requests it sends. No real KFP API
server can run here, so a small server on 127.0.0.1 replaces it and records them. `bagel run --local` runs on kfp's real local runner, with the
local launch backend; the ranks run a tiny stand-in training command and the
`ckpt` commands a tiny stand-in promotion CLI (both written below, through the
components' BAGEL_LAUNCH_SCRIPT / BAGEL_CLI_STANDIN test hooks) until the
trainer and checkpointer commands can run a stage in seconds.
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

pytestmark = pytest.mark.timeout(300)

STANDIN_TRAIN = r'''
import os, signal, sys, time
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
rank = int(os.environ["RANK"])
stage_dir = Path(args["run.storage"].removeprefix("file://")) / "runs" / args["run.name"] / args["run.stage"]
stage_dir.mkdir(parents=True, exist_ok=True)
marker = stage_dir / f"step-rank{rank}"
start = int(marker.read_text()) if marker.exists() else 0
if rank == 0:
    init_from = args.get("run.init_from", "")
    print(f"stage {args['run.stage']} starts at step {start} from {init_from or 'scratch'}", flush=True)
    (stage_dir / "init_from").write_text(init_from)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
fault = os.environ.get("BAGEL_FAULT_SIGTERM_AT_STEP")
for step in range(start + 1, 4):
    if stopping:
        sys.exit(75)
    marker.write_text(str(step))
    if fault and int(fault) == step and rank == 0:
        os.killpg(0, signal.SIGTERM)
        time.sleep(1)
if stopping:
    sys.exit(75)
'''

STANDIN_CKPT = r'''
import hashlib, json, shutil, sys
from pathlib import Path

argv = sys.argv[1:]
assert argv[0] == "ckpt", argv
command = argv[1]
options, overrides, i = {}, [], 2
while i < len(argv):
    if argv[i].startswith("--"):
        options[argv[i]] = argv[i + 1]
        i += 2
    else:
        overrides.append(argv[i])
        i += 1
storage = Path(options["--storage"].removeprefix("file://"))
digest = hashlib.sha256(json.dumps([options["--config"], sorted(overrides)]).encode()).hexdigest()[:16]
promoted = storage / "promoted" / digest
if command == "find-promoted":
    print(json.dumps({"uri": f"file://{promoted}", "digest": digest} if promoted.exists() else {}))
elif command == "promote":
    stage = Path(options["--config"]).stem
    source = storage / "runs" / options["--run"] / stage
    assert (source / "step-rank0").read_text() == "3", "the stage did not finish"
    shutil.copytree(source, promoted, dirs_exist_ok=True)
    print(json.dumps({"uri": f"file://{promoted}", "digest": digest, "reused": False}))
else:
    sys.exit(2)
'''


def load_ir(path):
    from kfp.pipeline_spec import pipeline_spec_pb2

    documents = list(yaml.safe_load_all(Path(path).read_text()))
    spec = pipeline_spec_pb2.PipelineSpec()
    # ignore_unknown_fields=False: any field the IR schema does not define fails the parse.
    json_format.ParseDict(documents[0], spec, ignore_unknown_fields=False)
    platform = pipeline_spec_pb2.PlatformSpec()
    json_format.ParseDict(documents[1], platform, ignore_unknown_fields=False)
    return documents, spec, platform


def bagel(*args, env=None, timeout=200):
    return subprocess.run([sys.executable, "-m", "bagel.platform", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_compile_writes_valid_ir(tmp_path):
    from kfp.kubernetes import kubernetes_executor_config_pb2

    output = tmp_path / "pipeline.yaml"
    completed = bagel(
        "pipeline", "compile", "--output", str(output), "--image", "registry.example/bagel:1", "--step-node-selector", "pool=cpu",
        "--step-env", "AWS_ENDPOINT_URL=https://s3.example.com", "--step-env", "BAGEL_DATA_ROOT=s3://bucket/data",
    )
    assert completed.returncode == 0, completed.stderr
    documents, spec, platform = load_ir(output)
    assert spec.pipeline_info.name == "bagel-training"
    tasks = spec.root.dag.tasks
    assert len(tasks) == 8
    for name, task in tasks.items():
        if name.startswith("train-stage"):
            assert not task.caching_options.enable_cache, name
        else:
            assert task.caching_options.enable_cache, name
    assert set(spec.root.output_definitions.parameters) == {"uri", "digest"}
    parameters = spec.root.input_definitions.parameters
    for name in ("run_name", "storage", "configs", "image", "node_pool", "run_alignment", "run_sft"):
        assert name in parameters
    containers = [e["container"] for e in documents[0]["deploymentSpec"]["executors"].values()]
    assert {c["image"] for c in containers} == {"registry.example/bagel:1"}
    for container in containers:
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env == {"AWS_ENDPOINT_URL": "https://s3.example.com", "BAGEL_DATA_ROOT": "s3://bucket/data"}
        # The step image has kfp already: no pip install at start-up.
        assert "pip install" not in " ".join(container["command"])
        assert container["resources"]["cpuRequest"] == 0.5
    executors = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 8
    for executor in executors.values():
        config = kubernetes_executor_config_pb2.KubernetesExecutorConfig()
        json_format.ParseDict(executor, config, ignore_unknown_fields=False)
        assert config.secret_as_env[0].secret_name == "bagel-storage"
        assert config.field_path_as_env[0].field_path == "metadata.namespace"
        assert dict(config.node_selector.labels) == {"pool": "cpu"}
    # Stage chaining: pretrain's training starts from alignment's promoted pointer.
    pretrain = tasks["train-stage-2"]
    assert pretrain.inputs.parameters["init_from"].task_output_parameter.producer_task == "promote-stage"


class _KfpApiStandIn(BaseHTTPRequestHandler):
    """Replies to the few KFP v2beta1 calls of create_run_from_pipeline_package and records them."""

    requests: list = []

    def _reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None, {k.lower(): v for k, v in self.headers.items()}))
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [{"experiment_id": "exp-1", "display_name": "bagel"}], "total_size": 1})
        return self._reply({})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.requests.append(("POST", self.path, body, {k.lower(): v for k, v in self.headers.items()}))
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        if self.path.startswith("/apis/v2beta1/runs"):
            return self._reply({"run_id": "run-123", "display_name": body.get("display_name"), "experiment_id": "exp-1"})
        return self._reply({})

    def log_message(self, *args):
        pass


def test_submit_sends_run_request():
    _KfpApiStandIn.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpApiStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        completed = bagel(
            "submit", "--host", f"http://127.0.0.1:{server.server_port}", "--experiment", "bagel", "--token", "secret-token",
            "--run", "exp-7b", "--storage", "s3://bucket/bagel", "--stages", "pretrain,sft", "--node-pool", '{"pool": "h100"}',
            "optim.lr=2e-5",
        )
    finally:
        server.shutdown()
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {"run_id": "run-123"}
    runs = [r for r in _KfpApiStandIn.requests if r[0] == "POST" and r[1].startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    _, _, body, headers = runs[0]
    assert headers.get("authorization") == "Bearer secret-token"
    assert body["display_name"] == "exp-7b"
    assert body["experiment_id"] == "exp-1"
    assert body["service_account"] == "bagel-launcher"
    parameters = body["runtime_config"]["parameters"]
    assert parameters["run_name"] == "exp-7b"
    assert parameters["storage"] == "s3://bucket/bagel"
    assert parameters["run_alignment"] is False
    assert parameters["run_pretrain"] is True
    assert parameters["node_pool"] == '{"pool": "h100"}'
    assert json.loads(parameters["overrides"]) == ["optim.lr=2e-5"]
    # The package travels whole: the IR and the kfp-kubernetes platform spec.
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "bagel-training"
    assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--storage", "s3://b/x", "parallel.tp=3"], "parallel degrees"),
        (["--storage", "s3://b/x", "paralel.tp=2"], "unknown key paralel"),
        (["--storage", "file:///tmp/bagel"], "local path"),
    ],
)
def test_submit_checks_configs_before_creating_the_run(arguments, expected):
    """A stage config that would fail in its pods is refused before any request reaches the KFP API."""
    completed = bagel("submit", "--host", "http://127.0.0.1:9", "--run", "r", "--stages", "pretrain,sft", *arguments)
    assert completed.returncode == 2
    assert expected in completed.stderr


def test_submit_rejects_unknown_stage():
    completed = bagel("submit", "--host", "http://127.0.0.1:9", "--run", "r", "--storage", "s3://b/x", "--stages", "pretrain,rlhf")
    assert completed.returncode == 2
    assert "rlhf" in completed.stderr


@pytest.mark.slow
def test_local_run_chains_and_resumes(tmp_path, write_stage_config):
    train_script = tmp_path / "standin_train.py"
    train_script.write_text(STANDIN_TRAIN)
    ckpt_script = tmp_path / "standin_ckpt.py"
    ckpt_script.write_text(STANDIN_CKPT)
    configs = tmp_path / "configs"
    configs.mkdir()
    for stage in ("alignment", "pretrain", "continued", "sft"):
        write_stage_config(configs / f"{stage}.yaml", run={"stage": stage}, job={"gpus_per_node": 0, "retry": {"backoff_s": 0.0}})
    storage = f"file://{tmp_path}/store"
    env = {**os.environ, "BAGEL_LAUNCH_SCRIPT": str(train_script), "BAGEL_CLI_STANDIN": str(ckpt_script)}
    arguments = [
        "run", "--local", "--run", "local-e2e", "--storage", storage, "--configs", str(configs),
        "--stages", "pretrain,sft", "--workdir", str(tmp_path / "work"), "--nproc-per-node", "2",
        "--preempt", "pretrain:2",
    ]
    completed = bagel(*arguments, env=env, timeout=280)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    summary = tmp_path / "work" / "local-e2e-summary.json"
    pointer = json.loads(summary.read_text())["final_checkpoint"]
    assert pointer["uri"].startswith(f"{storage}/promoted/")
    assert len(pointer["digest"]) == 16
    # `bagel run --local` prints a condensed view; the processes' full output is in the log file.
    logs = "".join(path.read_text() for path in (tmp_path / "work" / "logs").glob("*.log"))
    # pretrain was preempted at step 2 and resumed there; sft started from pretrain's promoted checkpoint.
    assert "stage pretrain starts at step 0" in logs
    assert "stage pretrain starts at step 2" in logs
    runs = tmp_path / "store" / "runs" / "local-e2e"
    assert not (runs / "alignment").exists()
    assert not (runs / "continued").exists()
    assert (runs / "sft" / "init_from").read_text().startswith(f"{storage}/promoted/")
    assert (runs / "sft" / "init_from").read_text() != pointer["uri"]

    # A second run of the same pipeline finds both promoted checkpoints and trains nothing.
    (runs / "sft" / "step-rank0").unlink()
    again = bagel(*arguments[:-2], env=env, timeout=200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(summary.read_text())["final_checkpoint"] == pointer
    assert not (runs / "sft" / "step-rank0").exists()
