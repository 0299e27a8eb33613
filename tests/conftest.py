import os

import pytest
import torch

os.environ.setdefault("PETL_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


@pytest.fixture(scope="session")
def tiny_backbone():
    """A tiny random ViT (the STYLE.md test config): depth 4, width 64, 32 px, patch 4."""
    from petl_platform import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)


@pytest.fixture(scope="session")
def tiny_backbone8():
    """Depth-8 variant for methods that need more blocks (DTL's M, 4 early-exit stages of 2)."""
    from petl_platform import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=8, embed_dim=64, num_heads=2)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="module")
def one_thread():
    """The shared 2-core machine runs tiny models several times faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def petl_cli(capsys, monkeypatch):
    """The CLI in this process: ``petl_cli(*args)`` returns a ``CompletedProcess`` (returncode,
    stdout, stderr) like ``subprocess.run(["petl", *args], capture_output=True, text=True)``, without
    a new interpreter's imports (torch, MLflow, Ray: 8-20 s each on the 2-core machine). The
    subprocess paths keep their own tests (test_loop, test_secrets, test_token_auth)."""
    import subprocess

    from petl_platform.cli import main

    # main() sets MLFLOW_LOGGING_LEVEL if unset: undone after the test
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING"))

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's usage errors, as the process would exit
            rc = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["petl", *args], rc, out.out, out.err)

    return run


# ----------------------------------------------------------------------- shared across modules
# A module-scoped fixture that another module imports (test_bad_input_corpus imports test_serving's
# ``served``) is built once per module that uses it. ``shared_resources.use`` builds it once instead
# and keeps it while tests still to run use it; the collection hook below runs the importing
# module's tests right before the defining module's, so nothing else runs while it is up.
SHARED_FIXTURES = {"served": "test_serving.py"}  # fixture -> the module that defines it


def _fixtures(item) -> list:
    return getattr(item, "fixturenames", [])


def pytest_collection_modifyitems(session, config, items):
    for name, home in SHARED_FIXTURES.items():
        first = next((i for i, it in enumerate(items) if it.path.name == home and name in _fixtures(it)), None)
        if first is None:
            continue
        guests = [it for it in items if it.path.name != home and name in _fixtures(it)]
        rest = [it for it in items if it not in guests]
        at = rest.index(items[first])
        items[:] = rest[:at] + guests + rest[at:]


class SharedResources:
    """Context managers entered once per name; closed when no test still to run uses the fixture
    (``use``), or at the end of the session."""

    def __init__(self):
        self._open: dict = {}

    def use(self, request, name: str, factory):
        """The value of ``factory()`` (a context manager) for fixture ``name``, requested by a
        module-scoped fixture: entered on first use, exited after the last module that uses it."""
        from contextlib import ExitStack

        if name not in self._open:
            stack = ExitStack()
            self._open[name] = (stack.enter_context(factory()), stack)
        request.addfinalizer(lambda: self._release_unless_used_later(request, name))
        return self._open[name][0]

    def _release_unless_used_later(self, request, name: str) -> None:
        items = request.session.items
        mine = [i for i, it in enumerate(items) if getattr(it, "module", None) is request.module]
        if not any(name in _fixtures(it) for it in items[(max(mine) + 1 if mine else 0):]):
            self.release(name)

    def release(self, name: str) -> None:
        entry = self._open.pop(name, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        for name in list(self._open)[::-1]:
            self.release(name)


@pytest.fixture(scope="session")
def shared_resources():
    res = SharedResources()
    yield res
    res.close()


# ----------------------------------------------------------------------- leaving the process
# CI once saw the main test process end with SIGSEGV after pytest had printed "822 passed": in the
# interpreter's own teardown (torch and Ray's extension modules and their threads torn down in
# whatever order), not in a test, so a green run failed. By then every fixture is finalized and
# pytest has its exit status: the first exit handler to run (the last registered) shuts Ray down
# if a test left it connected, flushes the streams and leaves with that status, skipping the
# teardown. A crash while tests still run is not hidden: it still fails the run, and the Makefile
# sets PYTHONFAULTHANDLER, so it prints every thread's Python stack. PETL_TEST_FULL_EXIT=1 keeps
# the interpreter's normal exit (to chase the crash).
_SESSION: dict = {}


def pytest_sessionfinish(session):
    _SESSION["session"] = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    session = _SESSION.pop("session", None)
    if session is not None and session.config is config and not os.environ.get("PETL_TEST_FULL_EXIT"):
        import atexit

        atexit.register(_leave, int(session.exitstatus))


def _leave(status: int) -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed stream: nothing left to flush
            pass
    os._exit(status)
