"""The progress view and summary table of `bagel run --local`, on log lines copied from a real preempted run."""

import io
import json

from bagel.pipelines.progress import ProgressView, format_duration
from bagel.pipelines.report import StageReport, collect_reports, render_table

# Lines of a kfp local-runner log (a pretrain stage stopped at step 3 and resumed), as the runner indents them.
LOG = """\
    stage pretrain: training (config tiny/pretrain, run local)
    21:47:47 [rank0] INFO bagel.platform.train.trainer: starting at step 1 of 6 (init_from)
    21:47:49 [rank0] INFO bagel.platform.train.trainer: step 1/6 loss 2.7157 ce 6.2298 mse 1.1582 lr 4.00e-05 grad_norm 0.603 356 tok/s mfu n/a step 1.93s data 0.04s
    21:47:50 [rank1] INFO bagel.platform.train.trainer: step 1/6 loss 2.7157 ce 6.2298 mse 1.1582 lr 4.00e-05 grad_norm 0.603 356 tok/s mfu n/a step 1.93s data 0.04s
    21:47:50 [rank0] INFO bagel.platform.train.trainer: step 3/6 loss 2.7310 ce 6.2149 mse 1.1773 lr 8.00e-05 grad_norm 0.653 5242 tok/s mfu n/a step 0.16s data 0.00s
    21:47:50 [rank0] INFO bagel.platform.checkpoint.manager: checkpoint step 3 committed to file:///w/storage/runs/local/pretrain/checkpoints/step-00000003 in 0.50 s
    Traceback (most recent call last):
    21:47:54 INFO bagel.platform.launch.local: local run of local/pretrain, submission 1/5: preempted (CheckpointedOnSignal), exit code 75: the trainer saved and stopped
    21:47:54 WARNING bagel.platform.launch.local: stage pretrain was preempted; running it again in 1 s
    21:48:08 [rank0] INFO bagel.platform.train.trainer: starting at step 4 of 6 (checkpoint)
    21:48:09 [rank0] INFO bagel.platform.train.trainer: step 4/6 loss 2.7092 ce 6.2170 mse 1.1550 lr 1.00e-04 grad_norm 0.701 2206 tok/s mfu n/a step 0.36s data 0.05s
    21:48:12 INFO bagel.platform.launch.local: local run of local/pretrain, submission 2/5: succeeded (Succeeded), exit code 0
    stage pretrain promoted: file:///w/storage/promoted/74fa (digest 74fa)
    stage sft: a checkpoint promoted from the same config exists (file:///w/storage/promoted/6c5e); not training
    stage sft promoted: file:///w/storage/promoted/6c5e (digest 6c5e)
"""


def test_progress_view_condenses_the_log():
    out = io.StringIO()
    times = iter([100.0, 102.0, 200.0])
    view = ProgressView(out, nproc=2, clock=lambda: next(times))
    for line in LOG.splitlines():
        view.feed(line)
    lines = out.getvalue().splitlines()
    assert lines == [
        "",
        "== pretrain: training on 2 rank(s) ==",
        "[pretrain] starting at step 1/6 (init_from)",
        "[pretrain] step 1/6  loss 2.7157  ce 6.2298  mse 1.1582  356 tok/s  ETA ?",
        # 2 s for 2 steps since step 1, 3 steps left.
        "[pretrain] step 3/6  loss 2.7310  ce 6.2149  mse 1.1773  5242 tok/s  ETA 0:03",
        "[pretrain] checkpoint of step 3 saved",
        "[pretrain] submission 1/5: preempted (CheckpointedOnSignal), exit code 75: the trainer saved and stopped",
        "[pretrain] preempted: resuming from its last checkpoint in 1 s",
        "[pretrain] starting at step 4/6 (checkpoint)",
        # The rate restarts with the new submission, so its first step has no ETA yet.
        "[pretrain] step 4/6  loss 2.7092  ce 6.2170  mse 1.1550  2206 tok/s  ETA ?",
        "[pretrain] promoted file:///w/storage/promoted/74fa",
        "",
        "== sft: reusing file:///w/storage/promoted/6c5e (promoted earlier from the same config digest); not training ==",
    ]
    assert view.stages["pretrain"].outcome == "trained"
    assert view.stages["pretrain"].submissions == 2
    assert view.stages["sft"].outcome == "reused"
    assert view.stages["sft"].promoted_digest == "6c5e"
    assert view.errors == []


def test_progress_view_reports_failures():
    out = io.StringIO()
    view = ProgressView(out, nproc=2)
    view.feed("21:00:00.000 - INFO - Task \x1b[96m'train-stage-2'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m")
    view.feed("    21:00:01 [rank0] ERROR bagel.platform.train.trainer: loss is NaN at step 3")
    # The launcher's repetition of the log tail is left out.
    view.feed("    21:00:02 ERROR bagel.platform.commands.launch:   | 21:00:01 [rank0] ERROR bagel.platform.train.trainer: loss is NaN")
    assert out.getvalue().splitlines() == [
        "error: pipeline task train-stage-2 failed",
        "21:00:01 [rank0] ERROR bagel.platform.train.trainer: loss is NaN at step 3",
    ]
    assert len(view.errors) == 2


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0:00", "1:00", "1:01", "1:02:05"]


def test_summary_reads_storage_and_renders_a_table(tmp_path):
    stage_dir = tmp_path / "runs" / "local" / "alignment"
    stage_dir.mkdir(parents=True)
    summary = {"stage": "alignment", "steps": 20, "tokens": 17427, "first_loss": 6.2427, "last_loss": 6.2171,
               "final_ce": 6.2171, "final_mse": None, "wall_time_s": 3.04, "goodput": 0.22}
    (stage_dir / "summary.json").write_text(json.dumps(summary))
    digest = "8340eb9239c56e3c18593476a68789adbaa719bc87ccdc24e8df6e4faf9cb08f"
    uri = f"{tmp_path.as_uri()}/promoted/{digest}"
    (stage_dir / "promoted.json").write_text(json.dumps({"uri": uri, "digest": digest, "reused": False}))

    reports = collect_reports(tmp_path.as_uri(), "local", ["alignment", "pretrain"], {"alignment": ("trained", 1)})
    assert reports[0] == StageReport(
        stage="alignment", outcome="trained", submissions=1, steps=20, tokens=17427, first_loss=6.2427,
        last_loss=6.2171, final_ce=6.2171, final_mse=None, wall_time_s=3.04, goodput=0.22,
        promoted_uri=uri, promoted_digest=digest,
    )
    # A stage the log never reached has no summary: it reads as not run, with empty cells.
    assert reports[1] == StageReport(stage="pretrain", outcome="not run", submissions=0)
    table = render_table(reports).splitlines()
    assert table[0].split() == ["stage", "outcome", "steps", "tokens", "loss", "first->last", "final", "CE", "final",
                                "MSE", "wall", "goodput", "digest"]
    assert table[2].split() == ["alignment", "trained", "20", "17427", "6.2427", "->", "6.2171", "6.2171", "-",
                                "3.0", "s", "22%", digest[:12]]
    assert table[3].split() == ["pretrain", "not", "run", "-", "-", "-", "-", "-", "-", "-", "-"]
    assert f"  alignment  {uri}  {digest}" in table
