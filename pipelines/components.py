"""The pipeline's components: launch one training stage, and promote its final checkpoint.

Both run the `bagel` command line in the step's container (the training image,
which has the package installed) and exchange only small pointers,
{"uri", "digest"} of a promoted checkpoint, never checkpoints themselves.

kfp serialises each function's source into the pipeline, so the functions
import what they need inside their bodies and share no module-level helpers.

Test hooks are environment variables of the step, never set in production.
BAGEL_LAUNCH_SCRIPT names a Python file that every rank runs instead of
`bagel train` (`bagel launch --script`). BAGEL_CLI_STANDIN names a Python
file run instead of `python -m bagel.platform` for the `ckpt` commands.
BAGEL_LAUNCH_PREEMPT (STAGE:STEP) is passed to `bagel launch --preempt`.
They let tests check the pipeline wiring with stand-in commands.
"""

from typing import NamedTuple

from kfp import dsl

# The image of the pipeline steps; `bagel pipeline compile --image` replaces it.
# It contains kfp (a dependency of this package), so the steps do not
# `pip install kfp` at start, which would fail on a cluster without internet.
DEFAULT_IMAGE = "ghcr.io/bagel-platform/bagel-train:0.1.0"


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_stage(
    stage: str,
    configs: str,
    run_name: str,
    storage: str,
    init_from: str,
    enabled: bool,
    image: str,
    node_pool: str,
    namespace: str,
    backend: str,
    nproc_per_node: int,
    overrides: str,
) -> str:
    """Launch one training stage with `bagel launch` and wait until it ends; return "trained", "reused" or "skipped".

    Args:
        stage: alignment, pretrain, continued or sft.
        configs: packaged config family ("tiny", "bagel-7b-mot": config `{configs}/{stage}`)
            or a directory of `{stage}.yaml` files (a path starting with "/" or ".").
        run_name: run name (the stage's checkpoints live under it, so a rerun resumes).
        storage: URI root of runs and promoted checkpoints.
        init_from: URI of the previous stage's promoted checkpoint ("" to start fresh).
        enabled: false skips the stage (its promotion passes `init_from` through).
        image: training image ("" keeps job.image of the config).
        node_pool: JSON object of node labels for job.node_pool.node_selector ("" keeps the config's).
        namespace: namespace of the job ("" uses the namespace of this step's pod).
        backend: "kubernetes" or "local" (torchrun on the machine running the step).
        nproc_per_node: local backend: torchrun processes.
        overrides: JSON list of extra KEY=VALUE overrides for every stage.
    """
    import json
    import os
    import subprocess
    import sys

    # Imported here: a lightweight component's body runs on its own in the step image, which has this package.
    from bagel.pipelines.config_names import stage_config_name

    if not enabled:
        print(f"stage {stage} is disabled; skipping it")
        return "skipped"

    config = stage_config_name(configs, stage)
    # The same overrides reach find-promoted here and promote later, so both compute the same digest;
    # the launch-only job.* settings below stay out of it.
    extra = json.loads(overrides) if overrides else []
    # On one machine a preempted stage can restart at once; the cluster's 30 s default
    # backoff waits for capacity that frees up elsewhere. A user override still wins.
    launch_extra = (["job.retry.backoff_s=1"] if backend == "local" else []) + list(extra)
    if image:
        launch_extra.append(f"job.image={image}")
    if node_pool:
        launch_extra.append(f"job.node_pool.node_selector={json.dumps(json.loads(node_pool))}")
    namespace = namespace or os.environ.get("BAGEL_POD_NAMESPACE", "")
    if namespace and backend == "kubernetes":
        launch_extra.append(f"job.namespace={namespace}")
    # omegaconf reads `run.init_from=` as null, so an empty pointer is left out.
    init_override = [f"run.init_from={init_from}"] if init_from else []

    standin = os.environ.get("BAGEL_CLI_STANDIN")
    bagel = [sys.executable, standin] if standin else [sys.executable, "-m", "bagel.platform"]
    found = subprocess.run(
        [*bagel, "ckpt", "find-promoted", "--config", config, "--storage", storage, *init_override, *extra],
        capture_output=True, text=True,
    )
    if found.returncode != 0:
        raise RuntimeError(f"bagel ckpt find-promoted failed with exit code {found.returncode}: {found.stderr[-2000:]}")
    pointer = json.loads(found.stdout.strip().splitlines()[-1] or "{}")
    if pointer.get("digest"):
        print(f"stage {stage}: a checkpoint promoted from the same config exists ({pointer['uri']}); not training")
        return "reused"

    print(f"stage {stage}: training (config {config}, run {run_name})", flush=True)
    command = [
        sys.executable, "-m", "bagel.platform", "launch", "--config", config, "--run", run_name, "--stage", stage,
        "--storage", storage, "--init-from", init_from, "--backend", backend, "--nproc-per-node", str(nproc_per_node),
    ]
    script = os.environ.get("BAGEL_LAUNCH_SCRIPT")
    if script:
        command += ["--script", script]
    preempt = os.environ.get("BAGEL_LAUNCH_PREEMPT")
    if preempt:
        command += ["--preempt", preempt]
    completed = subprocess.run([*command, *launch_extra])
    if completed.returncode != 0:
        raise RuntimeError(f"bagel launch of stage {stage} failed with exit code {completed.returncode}")
    return "trained"


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def promote_stage(
    stage: str,
    configs: str,
    next_stage: str,
    run_name: str,
    storage: str,
    init_from: str,
    init_digest: str,
    training: str,
    overrides: str,
) -> NamedTuple("Pointer", [("uri", str), ("digest", str)]):
    """Promote the stage's final checkpoint with `bagel ckpt promote`; return its pointer (uri, digest).

    A skipped stage passes (init_from, init_digest) through; a reused stage
    returns the existing promoted checkpoint. `init_digest` is an input so the
    step's cache key changes whenever the previous stage's checkpoint does.

    Args:
        stage, configs, run_name, storage, overrides: as for train_stage.
        next_stage: the stage that starts from this checkpoint ("" after the last one).
        init_from, init_digest: the pointer this stage started from.
        training: train_stage's result ("trained", "reused" or "skipped").
    """
    import json
    import os
    import subprocess
    import sys
    from collections import namedtuple

    from bagel.pipelines.config_names import stage_config_name

    output = namedtuple("Pointer", ["uri", "digest"])
    if training == "skipped":
        return output(init_from, init_digest)

    extra = json.loads(overrides) if overrides else []
    standin = os.environ.get("BAGEL_CLI_STANDIN")
    bagel = [sys.executable, standin] if standin else [sys.executable, "-m", "bagel.platform"]
    if training == "reused":
        command = [*bagel, "ckpt", "find-promoted", "--config", stage_config_name(configs, stage), "--storage", storage]
    else:
        command = [*bagel, "ckpt", "promote", "--config", stage_config_name(configs, stage), "--run", run_name, "--storage", storage]
        if next_stage:
            command += ["--next-config", stage_config_name(configs, next_stage)]
    init_override = [f"run.init_from={init_from}"] if init_from else []
    completed = subprocess.run([*command, *init_override, *extra], capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:3])} failed with exit code {completed.returncode}: {completed.stderr[-2000:]}")
    pointer = json.loads(completed.stdout.strip().splitlines()[-1])
    if not pointer.get("uri") or not pointer.get("digest"):
        raise RuntimeError(f"promotion of stage {stage} returned no checkpoint: {completed.stdout!r}")
    print(f"stage {stage} promoted: {pointer['uri']} (digest {pointer['digest']})")
    # The pointer next to the stage's summary.json lets `bagel run --local` report
    # what each stage promoted; the pipeline itself passes it on as outputs.
    from bagel.platform.checkpoint import storage as store
    from bagel.platform.layout import StageLayout

    fs, path = store.open_fs(f"{StageLayout(storage, run_name, stage).stage_dir}/promoted.json")
    store.write_json(fs, path, {"uri": pointer["uri"], "digest": pointer["digest"], "reused": training == "reused"})
    return output(pointer["uri"], pointer["digest"])
