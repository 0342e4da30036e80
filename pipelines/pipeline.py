"""The four-stage BAGEL pipeline: alignment -> pretrain -> continued -> sft, promoting between stages.

Per stage:  train_stage (launch and wait; never cached)  ->  promote_stage (cached on its inputs,
which include the previous checkpoint's digest). The promoted pointer {uri, digest} of one stage
is the `init_from` of the next; the pipeline's outputs are the last stage's pointer.

A disabled stage (run_<stage>=false) passes its input pointer through, so any subset of stages
can run, in order. `build_pipeline` returns the pipeline function for a step image and a storage
Secret. Its kfp-kubernetes settings (Secret as environment, node selector, pod labels, namespace
from the downward API) apply on a cluster, and the local runner ignores them.
"""

# No `from __future__ import annotations`: kfp reads the pipeline's type hints at runtime.
from typing import Any, Callable, NamedTuple, Optional

from kfp import dsl, kubernetes

from bagel.pipelines.components import DEFAULT_IMAGE, promote_stage, train_stage

STAGES = ("alignment", "pretrain", "continued", "sft")
PIPELINE_NAME = "bagel-training"
# Launcher steps only wait and stream logs; they must outlive the longest stage.
STEP_TIMEOUT_S = 30 * 24 * 3600
# Scheduling requests of a launcher step: one Python process that imports the
# package and streams logs (an estimate; the promote step may use more).
STEP_CPU_REQUEST = "500m"
STEP_MEMORY_REQUEST = "1G"


class PipelineOutput(NamedTuple):
    uri: str
    digest: str


def _configure_step(task: Any, storage_secret: str, step_node_selector: dict[str, str], step_env: dict[str, str]) -> None:
    """Apply the Kubernetes settings of a launcher step: storage credentials, environment, namespace, placement, labels."""
    if storage_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=storage_secret,
            secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
            optional=True,
        )
    kubernetes.use_field_path_as_env(task, env_name="BAGEL_POD_NAMESPACE", field_path="metadata.namespace")
    for name, value in sorted(step_env.items()):
        task.set_env_variable(name, value)
    for key, value in step_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_pod_label(task, label_key="app.kubernetes.io/name", label_value="bagel-platform")
    kubernetes.set_timeout(task, seconds=STEP_TIMEOUT_S)
    # Requests only: a promote step of a 7B checkpoint may need far more memory
    # than a launch step, and a limit would turn that into an OOM kill.
    task.set_cpu_request(STEP_CPU_REQUEST)
    task.set_memory_request(STEP_MEMORY_REQUEST)


def build_pipeline(
    image: str = DEFAULT_IMAGE,
    storage_secret: str = "bagel-storage",
    step_node_selector: Optional[dict[str, str]] = None,
    step_env: Optional[dict[str, str]] = None,
) -> Callable:
    """Return the pipeline function; `image` is the step image, `storage_secret` the credentials Secret ("" for none).

    `step_env` sets environment variables of the pipeline's own steps (an S3
    endpoint, `BAGEL_DATA_ROOT`), fixed when the pipeline is compiled.
    """
    train = train_stage
    promote = promote_stage
    if image != DEFAULT_IMAGE:
        train = _with_image(train_stage, image)
        promote = _with_image(promote_stage, image)
    selector = dict(step_node_selector or {})
    environment = dict(step_env or {})

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Train BAGEL in four stages (alignment, pretrain, continued, sft) with checkpoint promotion between them.",
    )
    def bagel_training(
        run_name: str,
        storage: str,
        configs: str = "bagel-7b-mot",
        init_from: str = "",
        init_digest: str = "",
        image: str = "",
        node_pool: str = "",
        namespace: str = "",
        backend: str = "kubernetes",
        nproc_per_node: int = 1,
        overrides: str = "",
        run_alignment: bool = True,
        run_pretrain: bool = True,
        run_continued: bool = True,
        run_sft: bool = True,
    ) -> PipelineOutput:
        enabled = {"alignment": run_alignment, "pretrain": run_pretrain, "continued": run_continued, "sft": run_sft}
        pointer_uri: Any = init_from
        pointer_digest: Any = init_digest
        for index, stage in enumerate(STAGES):
            next_stage = STAGES[index + 1] if index + 1 < len(STAGES) else ""
            trained = train(
                stage=stage,
                configs=configs,
                run_name=run_name,
                storage=storage,
                init_from=pointer_uri,
                enabled=enabled[stage],
                image=image,
                node_pool=node_pool,
                namespace=namespace,
                backend=backend,
                nproc_per_node=nproc_per_node,
                overrides=overrides,
            )
            trained.set_display_name(f"train {stage}")
            trained.set_caching_options(enable_caching=False)
            _configure_step(trained, storage_secret, selector, environment)

            promoted = promote(
                stage=stage,
                configs=configs,
                next_stage=next_stage,
                run_name=run_name,
                storage=storage,
                init_from=pointer_uri,
                init_digest=pointer_digest,
                training=trained.output,
                overrides=overrides,
            )
            promoted.set_display_name(f"promote {stage}")
            promoted.set_caching_options(enable_caching=True)
            _configure_step(promoted, storage_secret, selector, environment)
            pointer_uri = promoted.outputs["uri"]
            pointer_digest = promoted.outputs["digest"]
        return PipelineOutput(uri=pointer_uri, digest=pointer_digest)

    return bagel_training


def _with_image(component: Any, image: str) -> Any:
    """Return the same lightweight component built to run in `image`."""
    return dsl.component(base_image=image, install_kfp_package=False)(component.python_func)


def compile_pipeline(path: str, image: str = DEFAULT_IMAGE, storage_secret: str = "bagel-storage") -> None:
    """Write the pipeline's IR YAML to `path`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(image, storage_secret), package_path=path, pipeline_name=PIPELINE_NAME)
