"""scripts/train_slurm.sbatch on a real two-node SLURM cluster (tests/scripts/conftest.py),
submitted as docs/cluster.md shows it: two nodes with one (simulated) GPU each train the tiny
config with world size 2 to the weights of one process; a preempted job saves at its
iteration, ends COMPLETED 0:0 and resumes by requeue or by the same command to the weights
of the uninterrupted job; a batch setting that the allocation cannot hold is refused before
torchrun starts."""
from __future__ import annotations

import pytest

from .conftest import assert_same_weights, checkpoint, metrics, wait_for_line

pytestmark = pytest.mark.slurm

SCRIPT = "scripts/train_slurm.sbatch"
#: What the two nodes of the test cluster hold: one GPU and the CPUs of this machine each.
NODES = ("--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1")


def _submit(cluster, script_env, log, config, *overrides, env=None):
    """``sbatch --nodes=2 --gpus-per-node=1 --cpus-per-task=1 --output=LOG
    scripts/train_slurm.sbatch CONFIG KEY=VALUE...`` from the repository's root."""
    return cluster.sbatch(*NODES, f"--output={log}", SCRIPT, config, *overrides,
                          env=env or script_env())


@pytest.fixture(scope="session")
def slurm_run(slurm_cluster, script_env, tiny_config, tmp_path_factory):
    """The tiny config trained by an uninterrupted two-node job: (output_dir, log, job)."""
    base = tmp_path_factory.mktemp("slurm_run")
    out, log = base / "run", base / "slurm.out"
    job = slurm_cluster.wait(_submit(slurm_cluster, script_env, log, tiny_config,
                                     f"output_dir={out}"))
    return out, log.read_text() if log.exists() else "", job


def test_two_nodes_train_like_one_process(slurm_run, one_process_run):
    out, log, job = slurm_run
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert ("train_slurm.sbatch: 2 node(s) x 1 process(es) = world size 2 for batch.gpus=2"
            in log)
    assert "on 2 process(es) x 1 virtual GPU(s)" in log  # one process per node
    assert "finished epoch 2/2" in log
    assert_same_weights(out, one_process_run, exact=False)


def test_preemption_saves_completes_and_resumes(slurm_cluster, slurm_run, script_env,
                                                tiny_config, tmp_path):
    """``scancel --signal=TERM --batch`` (what ``--signal=B:TERM@300`` sends) in mid-epoch:
    both ranks save at the current iteration and the job ends COMPLETED 0:0 (not FAILED 137,
    not 143); ``scontrol requeue`` resumes it (preempted again, in the second epoch), then
    the same sbatch command resumes it to the end: the weights and metrics of the
    uninterrupted job, bit for bit."""
    cluster, out, log = slurm_cluster, tmp_path / "run", tmp_path / "slurm.out"
    command = (tiny_config, f"output_dir={out}", "checkpoint.every_iters=0")

    def preempt(job_id, line, start=0):
        wait_for_line(log, line, lambda: cluster.running(job_id), 180, start)
        cluster.run("scancel", "--signal=TERM", "--batch", str(job_id))
        return cluster.wait(job_id)

    job_id = _submit(cluster, script_env, log, *command)
    job = preempt(job_id, r"^epoch 1/2 iter 1/6 ")
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text
    state = checkpoint(out)  # only SIGTERM writes one (checkpoint.every_iters=0)
    assert state["epoch"] == 0 and 1 <= state["iter"] < 6 and len(state["meters"]) == 2
    assert (f"SIGTERM: saved {out}/checkpoint_last.pth in epoch 1/2 after iteration "
            f"{state['iter']}/6" in text)
    assert "train_slurm.sbatch: SIGTERM: the training processes save" in text
    assert "Killed" not in text and "srun: error" not in text, text

    start = len(text)  # --open-mode=append: the requeued job writes to the same log
    cluster.run("scontrol", "requeue", str(job_id))
    # it would wait 2 minutes (cred_expire); in the second its last run ended, slurmd refuses
    # to start it again ("Job credential revoked"): in 2 s
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")
    job = preempt(job_id, r"^epoch 2/2 iter 1/6 ", start)
    text = log.read_text()[start:]
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert f"resumed from {out}/checkpoint_last.pth" in text
    state = checkpoint(out)
    assert state["epoch"] == 1 and 1 <= state["iter"] < 6

    log = tmp_path / "again.out"
    job = cluster.wait(_submit(cluster, script_env, log, *command))  # the same command
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "resumed from" in text and "finished epoch 2/2" in text
    assert_same_weights(out, slurm_run[0], exact=True)
    keys = ("train_loss", "train_top1", "val_top1", "val_loss", "lr")
    assert [{k: r[k] for k in keys} for r in metrics(out)] == \
        [{k: r[k] for k in keys} for r in metrics(slurm_run[0])]


def test_batch_setting_the_allocation_cannot_hold_is_refused(slurm_cluster, script_env,
                                                              tiny_config, tmp_path):
    """Before torchrun starts, in one line naming batch.gpus, the world size and the sbatch
    options that fit; the same with NPROC on a node without GPUs."""
    cluster = slurm_cluster
    log = tmp_path / "gpus.out"
    job = cluster.wait(_submit(cluster, script_env, log, tiny_config,
                               f"output_dir={tmp_path / 'run'}", "batch.gpus=3"))
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0")
    assert log.read_text() == (
        "train_slurm.sbatch: batch.gpus=3 is not divisible by the world size 2 (2 node(s) x 1 "
        "GPU(s) per node): submit with --nodes=1 --gpus-per-node=3 or --nodes=1 "
        "--gpus-per-node=1\n")
    assert not (tmp_path / "run").exists()  # nothing started

    log = tmp_path / "nproc.out"
    job_id = cluster.sbatch("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                            f"--output={log}", SCRIPT, tiny_config,
                            f"output_dir={tmp_path / 'run'}", env=script_env(NPROC="2"))
    job = cluster.wait(job_id)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0")
    assert log.read_text() == (
        "train_slurm.sbatch: batch.gpus=2 is not divisible by the world size 4 (2 node(s) x 2 "
        "process(es) per node (NPROC)): submit with --nodes=2 (NPROC=1) or --nodes=1 (NPROC=2)"
        " or --nodes=1 (NPROC=1)\n")
    assert not (tmp_path / "run").exists()
