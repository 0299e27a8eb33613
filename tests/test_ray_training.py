"""Integration: a local Ray cluster (2 CPUs), a real S3-compatible server on 127.0.0.1 (moto),
MLflow on SQLite with artifacts in the bucket. Ray Train with 2 workers, an ASHA sweep that
registers its champion, a trial and a one-worker train whose worker is killed and resume from
their checkpoints."""

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest

from platform_stack import platform_stack, s3_keys
from petl_platform.training.spec import SweepSpec, TrainSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray

    from petl_platform.cluster.connect import ensure_ray

    with platform_stack(tmp_path_factory.mktemp("stack")) as st:
        ensure_ray(num_cpus=2)
        try:
            yield st
        finally:
            ray.shutdown()


def _client(st):
    return mlflow.MlflowClient(st["settings"].tracking_uri)


def _artifact_keys(st, run_id: str) -> list[str]:
    return [k for k in s3_keys(st["s3"], "mlflow/") if f"/{run_id}/artifacts/" in k]


def test_two_worker_ray_train_logs_to_mlflow_and_s3(stack):
    from petl_platform.cluster.train import run_train

    out = run_train(TrainSpec(task="digits-1k", method="lora", backbone=stack["backbone"], settings=stack["settings"],
                              hparams={"rank": 2}, train={"epochs": 2, "batch_size": 32}, workers=2, name="train-2w"))
    assert out["workers"] == 2 and 0.0 <= out["test_accuracy"] == out["accuracy"] <= 1.0
    assert out["trainable_params"] > 0 and out["peak_mem_mb"] > 0 and out["wall_s"] > 0
    run = _client(stack).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["petl.world_size"] == "2" and run.data.tags["petl.method"] == "lora"
    # what `petl train --register` does with the result: the Ray Train run's adapter becomes a version
    from petl_platform.training.run import register_run

    reg = register_run(stack["settings"], "digits-1k", "lora", out["mlflow_run_id"], out["val_accuracy"],
                       model_name="{task}-{method}")
    assert (reg["name"], reg["version"], reg["decision"]) == ("digits-1k-lora", 1, "first")
    assert len(run.data.tags["petl.backbone_fingerprint"]) == 16  # sha256 prefix
    assert {"val_accuracy", "train_loss", "gflops_per_image", "img_per_s", "test_accuracy"} <= set(run.data.metrics)
    assert [m.step for m in _client(stack).get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    keys = _artifact_keys(stack, run.info.run_id)
    assert any(k.endswith("adapter/adapter.safetensors") for k in keys), keys
    assert Path(out["checkpoint"], "checkpoint.pt").exists()  # trainable state in Ray storage


def test_asha_sweep_registers_champion_with_artifacts_in_s3(stack, tmp_path):
    from petl_platform import create_backbone
    from petl_platform.cli import main
    from petl_platform.tracking.artifacts import load_adapter
    from petl_platform.tracking.runs import fetch_adapter, register_adapter
    from petl_platform.cluster.tune import run_sweep, to_tune

    # One good learning rate first, then three that cannot learn: ASHA must cut the three at rung 1.
    # (Under ASHA a grid comes in an order drawn from the seed, 0 here: this one stays first.)
    assert to_tune({"lr": ("grid", [0.05, 1e-6, 1e-6, 1e-6])}, 0)["lr"]["grid_search"][0] == 0.05
    [s] = run_sweep(SweepSpec(tasks=("digits-1k",), method="dyn_linear", backbone=stack["backbone"],
                              settings=stack["settings"], space=("lr=grid(0.05,1e-6,1e-6,1e-6)", "p_m=choice(0.0,0.2)"),
                              samples=1, epochs=4, train={"batch_size": 32, "warmup_epochs": 0}, max_concurrent=2,
                              name="asha", progress=False))
    assert len(s["trials"]) == 4 and all(t["error"] is None for t in s["trials"])
    assert any(t["stopped_early"] for t in s["trials"]) and s["trial_epochs"] < s["grid_epochs"]
    best = s["best"]
    assert best["val_accuracy"] == max(t["val_accuracy"] for t in s["trials"])
    # test accuracy is measured once, at a trial's last epoch: none for a trial ASHA stopped
    for t in s["trials"]:
        assert (t["test_accuracy"] is None) == t["stopped_early"], t
    assert 0 < best["test_accuracy"] <= 1
    c = _client(stack)
    for t in s["trials"]:
        run = c.get_run(t["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == s["parent_run_id"]
        assert len(c.get_metric_history(t["run_id"], "val_accuracy")) == t["epochs"]
        assert "exit_frac_s1" in run.data.metrics and "exit_flops_fraction" in run.data.metrics
        assert any(k.endswith("adapter/adapter.safetensors") for k in _artifact_keys(stack, t["run_id"]))
    parent_keys = _artifact_keys(stack, s["parent_run_id"])
    assert any(k.endswith("plots/val_accuracy_vs_lr.png") for k in parent_keys)
    assert any(k.endswith("plots/accuracy_vs_flops.png") for k in parent_keys)
    assert c.get_run(s["parent_run_id"]).info.status == "FINISHED"

    # The registry: alias champion on the best trial, downloadable from S3 and loadable.
    champion = c.get_model_version_by_alias("digits-1k", "champion")
    assert champion.run_id == best["run_id"] and s["registered"]["version"] == int(champion.version)
    # the first registration of a model: no champion to beat, so it moves (and is also the challenger)
    reg = s["registered"]
    assert (reg["champion_moved"], reg["decision"], reg["val_accuracy"]) == (True, "first", best["val_accuracy"])
    assert champion.tags["petl.val_split"].startswith("digits-1k:val") and champion.tags["petl.promotion"] == reg["reason"]
    assert c.get_model_version_by_alias("digits-1k", "challenger").version == champion.version
    path, info = fetch_adapter(stack["settings"], "models:/digits-1k@champion", str(tmp_path / "dl"))
    model = load_adapter(path, create_backbone(stack["backbone"]))
    assert model.method == "dyn_linear" and info["run_id"] == best["run_id"]

    # A second version, then `petl registry promote` moves the alias back and forth.
    other = next(t for t in s["trials"] if t["run_id"] != best["run_id"])
    v2 = register_adapter(stack["settings"], other["run_id"], "digits-1k", alias=None)
    assert main(["registry", "promote", "digits-1k", str(v2.version), "--json"]) == 0
    assert c.get_model_version_by_alias("digits-1k", "champion").version == v2.version
    assert c.get_model_version("digits-1k", v2.version).tags["petl.promotion"].startswith("manual: champion moved")
    assert main(["registry", "promote", "digits-1k", "99"]) == 2  # no such version: one line, exit 2


def test_hyperband_pauses_trials_and_each_resumes_in_its_own_run(stack):
    from petl_platform.cluster.tune import run_sweep, to_tune

    # 3 epochs, reduction factor 3: Tune's Hyperband runs the first 2 trials (a bracket) all 3 epochs,
    # and compares the next ones (a second bracket) at epoch 1. One at a time (2 CPUs each on the
    # 2-CPU cluster), the 3rd trial (the one that learns) reaches epoch 1, pauses and frees the CPUs;
    # the 4th reaches it and stops; the 3rd goes on from its checkpoint. (The grid's order is drawn
    # from the seed, 0 here: the learning lr stays 3rd.)
    assert to_tune({"lr": ("grid", [1e-6, 1e-6, 0.05, 1e-6])}, 0)["lr"]["grid_search"][2] == 0.05
    [s] = run_sweep(SweepSpec(tasks=("digits-1k",), method="dyn_linear", backbone=stack["backbone"],
                              settings=stack["settings"], space=("lr=grid(1e-6,1e-6,0.05,1e-6)",), samples=1,
                              epochs=3, train={"batch_size": 32, "warmup_epochs": 0}, cpus_per_trial=2,
                              scheduler="hyperband", name="hyperband", progress=False))
    assert s["hyperband"] == {"max_t": 3, "reduction_factor": 3} and "asha" not in s
    trials = s["trials"]
    assert len(trials) == 4 and all(t["error"] is None for t in trials)
    assert any(t["stopped_early"] for t in trials) and s["trial_epochs"] < s["grid_epochs"]
    assert s["best"]["params"]["lr"] == 0.05 and s["best"]["val_accuracy"] == max(t["val_accuracy"] for t in trials)
    c = _client(stack)
    assert c.get_run(s["parent_run_id"]).data.params["hyperband.max_t"] == "3"
    resumed = 0
    for t in trials:
        run = c.get_run(t["run_id"])
        assert run.info.status == "FINISHED"
        # one run per trial however often it paused: each epoch logged once, in order
        steps = [m.step for m in c.get_metric_history(t["run_id"], "val_accuracy")]
        assert sorted(steps) == list(range(1, t["epochs"] + 1)), steps
        resumed += run.data.tags.get("petl.resumed_from_epoch") == "1"
    [good] = [t for t in trials if t["params"]["lr"] == 0.05]
    assert good["epochs"] == 3 and s["best"]["run_id"] == good["run_id"]
    assert sorted(t["epochs"] for t in trials if t is not good) == [1, 3, 3]  # the 4th stopped at epoch 1
    assert resumed == 1, "the trial that paused at its rung did not go on in its own run"


def _kill_worker_after_first_checkpoint(stack, runs_filter: str, experiment_dir: str) -> tuple[threading.Thread, dict]:
    """Starts a thread that SIGKILLs the worker of the one MLflow run matching ``runs_filter`` once
    its first checkpoint is registered; ``seen`` gets the killed ``pid`` and the ``run_id``."""
    c, seen = _client(stack), {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and "pid" not in seen:
            exp = c.get_experiment_by_name("petl")
            runs = c.search_runs([exp.experiment_id], f"{runs_filter} and metrics.val_accuracy >= 0") if exp else []
            ckpts = list(Path(stack["settings"].storage_path, experiment_dir).glob("**/checkpoint_0000*"))
            trial_runs = [r for r in runs if "petl.worker_pid" in r.data.tags]
            # Tune registers a checkpoint only once its separate save step returns, and a function
            # trial goes on past a report only after that (a trainer uploads it in the report):
            # metrics of a second epoch mean the first checkpoint is registered (a kill before
            # then restarts the trial from scratch)
            if trial_runs and ckpts and max(m.step for m in c.get_metric_history(
                    trial_runs[0].info.run_id, "val_accuracy")) >= 2:
                seen["pid"] = int(trial_runs[0].data.tags["petl.worker_pid"])
                seen["run_id"] = trial_runs[0].info.run_id
                os.kill(seen["pid"], signal.SIGKILL)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    return killer, seen


def test_one_worker_train_on_a_trainer_resumes_after_its_trainer_dies(stack):
    """``petl train`` with one worker runs on a trainer (``cluster.trainer``): killed after its
    first checkpoint, the job resumes from it on a new trainer, in the same MLflow run, and returns
    what the trial reported (not the trial's config)."""
    from petl_platform.cluster.train import run_train

    c = _client(stack)
    killer, seen = _kill_worker_after_first_checkpoint(stack, "tags.`petl.job` = 'train-kill'", "train-kill")
    out = run_train(TrainSpec(task="digits-1k", method="linear", backbone=stack["backbone"], settings=stack["settings"],
                              train={"epochs": 5, "batch_size": 16}, workers=1, max_failures=1, name="train-kill"))
    killer.join(5)
    assert "pid" in seen, "the trial never checkpointed"
    assert out["mlflow_run_id"] == seen["run_id"] and out["epoch"] == 5 and out["workers"] == 1
    assert 0.0 <= out["test_accuracy"] == out["accuracy"] <= 1.0 and out["name"] == "train-kill"
    assert not {"config", "trial_id", "pid", "training_iteration"} & set(out), sorted(out)
    assert Path(out["checkpoint"], "checkpoint.pt").exists()  # trainable state in Ray storage
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-kill"
    assert int(run.data.tags["petl.resumed_from_epoch"]) >= 1  # resumed, not restarted from scratch
    assert int(run.data.tags["petl.worker_pid"]) != seen["pid"]
    assert {m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")} == set(range(1, 6))


def test_one_worker_train_out_of_retries_fails_with_its_checkpoint_and_a_failed_run(stack):
    """max_failures=0 and a lost worker: one line, the run FAILED with the reason, and the last
    checkpoint kept in Ray storage."""
    from petl_platform.cluster.train import run_train
    from petl_platform.errors import PetlError

    c = _client(stack)
    killer, seen = _kill_worker_after_first_checkpoint(stack, "tags.`petl.job` = 'train-lost'", "train-lost")
    with pytest.raises(PetlError) as err:
        run_train(TrainSpec(task="digits-1k", method="linear", backbone=stack["backbone"], settings=stack["settings"],
                            train={"epochs": 8, "batch_size": 16}, workers=1, max_failures=0, name="train-lost"))
    killer.join(5)
    assert "pid" in seen, "the trial never checkpointed"
    assert str(err.value).startswith("training failed: ") and "\n" not in str(err.value)
    run = c.get_run(seen["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["petl.failure"] == str(err.value)
    assert list(Path(stack["settings"].storage_path, "train-lost").glob("checkpoint_0000*/checkpoint.pt"))


def test_one_worker_jobs_share_a_trainer_that_a_sweep_would_release(stack):
    """Two `petl train` jobs on a running cluster: the second runs in the first one's process (no
    new worker, no imports), each in its own MLflow run with its own checkpoints; idle, the
    trainer ends when a command needs its CPUs (``release_idle_trainers``, which sweeps call)."""
    from petl_platform.cluster.train import run_train
    from petl_platform.cluster.trainer import _trainers, release_idle_trainers

    release_idle_trainers()
    c = _client(stack)
    outs = [run_train(TrainSpec(task="digits-1k", method="linear", backbone=stack["backbone"],
                                settings=stack["settings"], train={"epochs": 1, "batch_size": 32}, name=f"reuse-{i}"))
            for i in range(2)]
    runs = [c.get_run(o["mlflow_run_id"]) for o in outs]
    assert runs[0].info.run_id != runs[1].info.run_id and all(r.info.status == "FINISHED" for r in runs)
    assert runs[0].data.tags["petl.worker_pid"] == runs[1].data.tags["petl.worker_pid"]
    for i, o in enumerate(outs):
        assert Path(o["checkpoint"]) == Path(stack["settings"].storage_path, f"reuse-{i}", "checkpoint_000001")
        assert Path(o["checkpoint"], "checkpoint.pt").exists()
    assert len(_trainers()) == 1
    assert release_idle_trainers() == 1 and _trainers() == []


def test_an_idle_trainer_ends_itself_and_frees_its_cpus(stack):
    """PETL_TRAINER_IDLE_S: a trainer with no job ends itself (the actor is gone, its name free, its
    CPU back in the cluster's available resources)."""
    import ray

    from petl_platform.cluster.trainer import NAMESPACE, _actor_class, _trainers

    before = ray.available_resources().get("CPU", 0)
    handle = _actor_class().options(name="petl-trainer-idle-test-0", namespace=NAMESPACE, lifetime="detached",
                                    num_cpus=1).remote(0.5)
    ray.get(handle.pid.remote())
    assert "petl-trainer-idle-test-0" in _trainers()
    deadline = time.time() + 60
    while time.time() < deadline and "petl-trainer-idle-test-0" in _trainers():
        time.sleep(0.2)
    assert "petl-trainer-idle-test-0" not in _trainers(), "the idle trainer never ended"
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < before:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) >= before


def test_an_interrupted_job_stops_its_trainer_and_fails_its_run(stack):
    """Ctrl-C in `petl train` cancels the job on its trainer (``ray.cancel``): the trainer stops it
    at its next epoch, the MLflow run is FAILED with the reason, and the trainer takes jobs again."""
    import ray

    from petl_platform.cluster.connect import storage
    from petl_platform.cluster.trainer import INTERRUPTED, _claim, release_idle_trainers
    from petl_platform.training.trial import trial_config

    st = stack["settings"]
    config = trial_config("digits-1k", "linear", stack["backbone"], st, "petl", train={"epochs": 40, "batch_size": 16},
                          tags={"petl.job": "interrupted"}, run_name="interrupted")
    handle = _claim(1, 0, 300)
    path, fs = storage(st.storage_path)
    gen = handle.fit.remote(config, path, "interrupted", fs, ray.get_runtime_context().get_job_id(), 1)
    first = ray.get(next(gen))
    assert first["epoch"] == 1
    ray.cancel(gen)
    c, deadline = _client(stack), time.time() + 120
    while time.time() < deadline and c.get_run(first["mlflow_run_id"]).info.status == "RUNNING":
        time.sleep(0.5)
    run = c.get_run(first["mlflow_run_id"])
    assert run.info.status == "FAILED" and INTERRUPTED in run.data.tags["petl.failure"]
    assert max(m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")) < 40
    while time.time() < deadline and not ray.get(handle.claim.remote()):
        time.sleep(0.5)
    ray.kill(handle)  # claimed above: the trainer was free again
    assert time.time() < deadline
    release_idle_trainers()


def test_killed_worker_trial_resumes_from_checkpoint(stack):
    from petl_platform.cluster.tune import run_sweep

    c = _client(stack)
    killer, seen = _kill_worker_after_first_checkpoint(stack, "tags.`petl.sweep` = 'kill-digits-1k'", "kill-digits-1k")
    [s] = run_sweep(SweepSpec(tasks=("digits-1k",), method="linear", backbone=stack["backbone"],
                              settings=stack["settings"], space=("lr=choice(0.01)",), samples=1, epochs=6,
                              scheduler="fifo", train={"batch_size": 16}, max_failures=1, name="kill",
                              register=False, progress=False))
    killer.join(5)
    assert "pid" in seen, "the trial never checkpointed"
    [t] = s["trials"]
    assert t["error"] is None and t["epochs"] == 6 and t["run_id"] == seen["run_id"]
    run = c.get_run(t["run_id"])
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["petl.resumed_from_epoch"]) >= 1  # resumed, not restarted from scratch
    assert int(run.data.tags["petl.worker_pid"]) != seen["pid"]
    assert {m.step for m in c.get_metric_history(t["run_id"], "val_accuracy")} == set(range(1, 7))
    # no run of the sweep is left RUNNING, even one a restart from scratch would have abandoned
    children = c.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'")
    assert children and all(r.info.status != "RUNNING" for r in children)


def test_sweep_end_marks_an_abandoned_trial_run_failed(stack):
    """A trial run that a restart from scratch left behind (worker lost before Tune registered a
    checkpoint) is closed FAILED with the reason; a run outside the sweep is not touched."""
    from petl_platform.tracking.runs import RunLogger
    from petl_platform.cluster.tune import _finalize

    c, st = _client(stack), stack["settings"]
    parent = RunLogger(st, "petl", run_name="sweep orphans", tags={"petl.role": "sweep"})
    orphan = RunLogger(st, "petl", tags={"mlflow.parentRunId": parent.run_id})
    other = RunLogger(st, "petl", run_name="not in the sweep")
    summary = _finalize([], st, "digits-1k", "linear", stack["backbone"], {}, 1, parent)
    assert summary["trials"] == [] and summary["best"] is None
    run = c.get_run(orphan.run_id)
    assert run.info.status == "FAILED" and "interrupted" in run.data.tags["petl.failure"]
    assert c.get_run(other.run_id).info.status == "RUNNING" and c.get_run(parent.run_id).info.status == "RUNNING"
    other.finish()
    parent.finish()
