"""Run the four-stage pipeline with kfp's local runner in this process (the child of `bagel run --local`).

    python -m bagel.pipelines.local_runner SPEC_JSON

SPEC_JSON is {"arguments": {pipeline parameter: value}, "pipeline_root": DIR}.
`bagel run --local` starts this in a child process so that it can keep the
runner's verbose task logs in a log file and print a condensed progress view.
On success the last line of output is `pipeline output: {"uri": ..., "digest": ...}`.
Exit codes: 0 succeeded, 1 a task failed.
"""

import json
import sys

OUTPUT_PREFIX = "pipeline output: "


def main() -> int:
    from kfp import local

    from bagel.pipelines.pipeline import build_pipeline

    spec = json.loads(sys.argv[1])
    # use_venv=False: the steps run with this interpreter, which has the package installed.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=spec["pipeline_root"])
    try:
        task = build_pipeline(storage_secret="")(**spec["arguments"])
    except RuntimeError as error:
        # kfp's local runner raises RuntimeError when a task fails; the task's own log precedes it.
        print(f"error: the pipeline failed: {error}", flush=True)
        return 1
    print(OUTPUT_PREFIX + json.dumps({"uri": task.outputs["uri"], "digest": task.outputs["digest"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
