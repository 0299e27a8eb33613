"""What a newcomer meets first: the README quickstart parses, and every default lands under PETL_HOME."""

import re
import shlex
from pathlib import Path

import mlflow

from petl_platform.cli import build_parser
from petl_platform.tracking.runs import client
from petl_platform.tracking.settings import TrackingSettings

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    start = text.index("```bash\n", text.index("## Quickstart")) + len("```bash\n")
    return text[start:text.index("```", start)]


def test_readme_quickstart_commands_parse():
    block = quickstart_block()
    assert len(block.splitlines()) <= 30
    petl_lines = [line for line in block.splitlines() if line.startswith("petl ")]
    assert {line.split()[1] for line in petl_lines} >= {"train", "registry", "serve"}
    parser = build_parser()
    for line in petl_lines:
        argv = shlex.split(re.split(r" [&>|] ", line)[0], comments=True)[1:]  # the command before & > |
        args = parser.parse_args(argv)  # a bad flag raises PetlError (one line, exit 2 in the CLI)
        assert args.cmd == argv[0]
    assert "curl" in block and "mlflow ui" in block and "PETL_HOME" in block


def test_readme_paths_honour_petl_home():
    text = README.read_text()
    assert not re.search(r"\$PWD/\.petl/mlflow\.db", text)  # the store is wherever $PETL_HOME is
    for line in text.splitlines():
        if "mlflow ui --backend-store-uri" in line:
            assert "PETL_HOME" in line, line


def test_default_experiment_artifacts_live_under_petl_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PETL_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "PETL_ARTIFACT_ROOT", "PETL_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    settings = TrackingSettings.from_env().prepare()
    settings.experiment("petl")
    c = mlflow.MlflowClient(settings.tracking_uri)
    locations = {e.name: e.artifact_location for e in c.search_experiments()}
    assert set(locations) == {"Default", "petl"}
    root = (home / "mlartifacts").as_uri()
    assert locations["Default"] == f"{root}/0" and locations["petl"] == f"{root}/petl"
    client(settings).search_experiments()
    assert not (tmp_path / "mlruns").exists()
