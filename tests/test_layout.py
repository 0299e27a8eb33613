"""The layout contract: `platform/` is a source root, never a package shadowing the stdlib."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_platform_is_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "petl_platform" / "__init__.py").exists()


def test_stdlib_platform_still_importable():
    import platform
    import uuid

    assert platform.system()  # the stdlib module, not our source root
    assert hasattr(platform, "python_version")
    assert uuid.uuid4().hex


def test_top_level_layout():
    for name in ("platform", "jobs", "serve_apps", "infra", "bench", "tests", "pyproject.toml", "Makefile",
                 "README.md", ".ci/run"):
        assert (ROOT / name).exists(), name
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make demo") < 600 and readme.index("make test") < 600
