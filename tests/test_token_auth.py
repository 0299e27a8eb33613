"""Integration: a real `ray start --head` with token auth (its own HOME, temp dir and free ports on
127.0.0.1). With the token in ~/.ray/auth_token or RAY_AUTH_TOKEN, `petl jobs`, `petl submit` and
`petl train --address` authenticate without RAY_AUTH_MODE; without it they fail fast in one line."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from platform_stack import free_port, platform_stack

pytestmark = pytest.mark.slow

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
BIN = Path(sys.executable).parent


def _wait_ready(proc, dashboard: str, token: str, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:  # the Jobs API answers (with the token) once the head is fully up
            if requests.get(f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"},
                            timeout=3).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"the token-auth head did not come up in {timeout} s:\n{log.read_text()[-3000:]}")


def _die_with_parent():
    """In the child: SIGTERM it when pytest dies without teardown (killed); `ray start --block`
    then stops the processes it started."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    with platform_stack(root) as st:
        home = root / "home"
        (home / ".ray").mkdir(parents=True)
        token = secrets.token_hex(32)
        (home / ".ray" / "auth_token").write_text(token)
        gcs, dash = free_port(), free_port()
        ports = {f"--{k}": str(free_port()) for k in ("ray-client-server-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                 "node-manager-port", "object-manager-port")}
        base = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
        log = root / "head.log"
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
               "--num-cpus", "2", "--temp-dir", str(root / "r"), "--disable-usage-stats",
               *[x for kv in ports.items() for x in kv]]
        with open(log, "w") as out:  # its own session: teardown signals the whole process group
            proc = subprocess.Popen(cmd, env={**base, "HOME": str(home), "RAY_AUTH_MODE": "token"},
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        try:
            _wait_ready(proc, f"http://127.0.0.1:{dash}", token, log)
            yield {**st, "root": root, "home": home, "token": token, "base_env": base,
                   "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:  # `ray start --block` stops its processes one by one (~30 s); the group's SIGKILL
                proc.wait(timeout=8)  # after a grace ends every one of them (they share its session)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _petl(head, *args, home=None, timeout=300, **env):
    """The CLI as a user runs it: RAY_AUTH_MODE unset, HOME ``home`` (an empty one by default)."""
    if home is None:
        home = head["root"] / "empty-home"
        home.mkdir(exist_ok=True)
    t = time.time()
    p = subprocess.run([str(BIN / "petl"), *args], capture_output=True, text=True, timeout=timeout,
                       env={**head["base_env"], "HOME": str(home), **env})
    p.wall_s = time.time() - t
    return p


def _assert_one_line_error(p, *words):
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("petl: error:"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and all(w in lines[0] for w in words), lines[0]
    # no 30 s of InvalidAuthToken retries: those come on top of the CLI's start (torch, MLflow and
    # Ray imports, the spec's checks), which alone took 19-21 s on a slow day of the 2-core machine
    assert p.wall_s < 28


def test_jobs_list_uses_the_token_file_or_env(head):
    p = _petl(head, "jobs", "list", "--address", head["dashboard"], "--json", home=head["home"])
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr[-2000:]
    p = _petl(head, "jobs", "list", "--address", head["dashboard"], RAY_AUTH_TOKEN=head["token"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert head["token"] not in p.stdout + p.stderr


def test_without_a_token_every_command_says_what_is_missing(head):
    want = ("requires a token", "~/.ray/auth_token", "RAY_AUTH_TOKEN")
    _assert_one_line_error(_petl(head, "jobs", "list", "--address", head["dashboard"]), head["dashboard"], *want)
    _assert_one_line_error(_petl(head, "submit", "train", "--task", "digits-1k", "--address", head["dashboard"]),
                           *want)
    _assert_one_line_error(_petl(head, "train", "--task", "digits-1k", "--method", "linear", "--backbone",
                                 head["backbone"], "--address", head["gcs"]), head["gcs"], *want)


def test_a_wrong_token_is_reported_as_rejected(head):
    wrong = secrets.token_hex(32)
    for p in (_petl(head, "jobs", "list", "--address", head["dashboard"], RAY_AUTH_TOKEN=wrong),
              _petl(head, "train", "--task", "digits-1k", "--method", "linear", "--backbone", head["backbone"],
                    "--address", head["gcs"], RAY_AUTH_TOKEN=wrong)):
        _assert_one_line_error(p, "rejected the token from RAY_AUTH_TOKEN")
        assert wrong not in p.stderr


def test_train_on_the_token_cluster_with_the_token_file(head):
    p = _petl(head, "train", "--task", "digits-1k", "--method", "linear", "--backbone", head["backbone"],
              "--epochs", "1", "--workers", "1", "--address", head["gcs"], home=head["home"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "digits-1k / linear on a Ray trainer: test accuracy" in p.stdout
    assert head["token"] not in p.stdout + p.stderr
    # quiet: petl's own lines only; Ray Train's per-epoch lines and the controller's core-worker
    # errors stay in Ray's log files, which the first line names
    terminal = p.stdout + p.stderr
    for ray_line in ("Checkpoint successfully created", "Reporting training result", "PreemptionWatcher",
                     "TrainController pid=", "RayTrainWorker pid=", "Requesting resources"):
        assert ray_line not in terminal, terminal[-3000:]
    lines = [ln for ln in terminal.splitlines() if ln.strip()]
    assert lines[0].startswith("Ray's logs (") and lines[1].startswith("epoch 1/1: train loss "), terminal[-3000:]
    assert all(ln.startswith(("Ray's logs (", "epoch ", "digits-1k / linear on a Ray trainer"))
               for ln in lines), terminal[-3000:]
