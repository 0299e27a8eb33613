"""`petl serve` looks the requested tasks up in the real registry (MLflow on SQLite, adapters in
moto's S3 server) before any cluster starts: one line per task, and a one-line refusal, with no
Ray started, when none of them is servable. Slow: the S3 server and MLflow (a few seconds: the SQLite
store is a copy of a migrated template, platform_stack.sqlite_store)."""

from pathlib import Path

import pytest

from platform_stack import platform_stack

pytestmark = pytest.mark.slow
LOCAL_YAML = str(Path(__file__).resolve().parents[1] / "serve_apps" / "configs" / "local.yaml")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from petl_platform import create_backbone

    with platform_stack(tmp_path_factory.mktemp("serve-cli")) as st:
        yield {**st, "bb": create_backbone(st["backbone"])}


@pytest.fixture
def no_cluster(monkeypatch):
    """Records what cmd_serve would deploy; fails the test if anything would start a cluster."""
    import subprocess

    from ray import serve

    import serve_apps.petl_app as petl_app

    calls = []
    monkeypatch.setattr(petl_app, "run_local", lambda path, tasks=None, port=None: calls.append(("run", tasks))
                        or "http://127.0.0.1:8000")
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append(("shutdown",)))
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(("deploy", argv[1:3])) or 0)
    return calls


def _register(stack, task, method, versions=1):
    from petl_platform.methods import build_model
    from petl_platform.tracking.runs import log_and_register

    for _ in range(versions):
        mv = log_and_register(stack["settings"], build_model(method, stack["bb"], 3), task, ["a", "b", "c"])
    return int(mv.version)


def test_one_servable_and_one_unregistered_task_are_reported_then_served(stack, no_cluster, capsys):
    from petl_platform.cli import main

    version = _register(stack, "digits-1k", "lora", versions=2)
    assert main(["serve", "--tasks", "digits-1k,fashion_mnist-1k", "--duration", "0.01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"servable: digits-1k (lora v{version})" and version == 2
    assert out[1].startswith("not servable: fashion_mnist-1k: ") and "no registered version" in out[1]
    assert no_cluster == [("run", ["digits-1k", "fashion_mnist-1k"]), ("shutdown",)]  # every named task deployed
    assert "GET http://127.0.0.1:8000/v1/tasks lists what is servable" in out


def test_none_servable_exits_with_one_line_before_any_cluster(stack, no_cluster, capsys):
    import ray

    from petl_platform.cli import main

    for argv in (["serve", "--tasks", "fashion_mnist-1k,letters-1k"],
                 ["serve", "--config", LOCAL_YAML, "--tasks", "fashion_mnist-1k", "--deploy", "--address",
                  "http://127.0.0.1:8265"]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("petl: error: none of the requested tasks is servable; "
                                                   "register one with "), err
        assert all(line.startswith("not servable: ") for line in captured.out.splitlines())
    assert no_cluster == [] and not ray.is_initialized()


def test_tasks_default_to_the_configs_and_the_alias_is_the_configs(stack, tmp_path, no_cluster, capsys):
    import yaml

    from petl_platform.cli import main

    cfg = yaml.safe_load(open(LOCAL_YAML))
    cfg["applications"][0]["args"].update(tasks=["shapes-1k", "shapes-1k"], alias="staging")
    (path := tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    _register(stack, "shapes-1k", "linear")  # champion only: no "staging" alias yet
    assert main(["serve", "--config", str(path), "--duration", "0.01"]) == 2
    assert capsys.readouterr().out.splitlines() == \
        ["not servable: shapes-1k: task 'shapes-1k' has no registered version under alias 'staging'"]
    assert main(["serve", "--config", str(path), "--no-check", "--duration", "0.01"]) == 0  # skips the lookup
    assert no_cluster[0] == ("run", None)  # the config's own tasks
    capsys.readouterr()
    del cfg["applications"][0]["args"]["tasks"]  # none named: the app serves what the registry holds
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--config", str(path), "--duration", "0.01"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == \
        "no tasks named: every task registered with alias 'staging' is servable on demand"


def test_the_configs_task_pattern_and_task_tag_apply_to_the_named_tasks(stack, tmp_path, no_cluster, capsys):
    """The pre-check applies the catalog's filters: a named task the server would never serve is
    reported with the filter that leaves it out, before any cluster starts."""
    import yaml

    from petl_platform.cli import main
    from petl_platform.tracking.runs import client

    _register(stack, "team-a-digits", "linear")
    _register(stack, "team-b-digits", "linear")
    client(stack["settings"]).set_registered_model_tag("team-b-digits", "team", "vision")
    cfg = yaml.safe_load(open(LOCAL_YAML))
    cfg["applications"][0]["args"].update(task_pattern="team-a-*")
    (path := tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--config", str(path), "--tasks", "team-a-digits,team-b-digits", "--duration", "0.01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "servable: team-a-digits (linear v1)"
    assert out[1] == "not servable: team-b-digits: the config's task_pattern 'team-a-*' does not match it"

    cfg["applications"][0]["args"].update(task_pattern=None, task_tag="team=vision")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--config", str(path), "--tasks", "team-a-digits", "--duration", "0.01"]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == ["not servable: team-a-digits: its registered model has no tag team=vision (the config's task_tag)"]
    assert main(["serve", "--config", str(path), "--tasks", "team-b-digits", "--duration", "0.01"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "servable: team-b-digits (linear v1)"

    cfg["applications"][0]["args"].update(task_tag="no-equals-sign")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--config", str(path), "--tasks", "team-b-digits", "--duration", "0.01"]) == 2
    assert capsys.readouterr().err.strip() == "petl: error: task_tag must be KEY=VALUE, got 'no-equals-sign'"
