"""tests/conftest.py's build_cached: one build per stamp, rebuilt when the stamp changes, and two
processes racing for the same target never see a half-written directory."""

from __future__ import annotations

import importlib.util
import multiprocessing
import time
from pathlib import Path

CONFTEST_PATH = Path(__file__).resolve().parents[1] / "conftest.py"


def load_conftest():
    spec = importlib.util.spec_from_file_location("conftest_under_test", CONFTEST_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slow_build(out_dir: Path) -> None:
    (out_dir / "first").write_text("1")
    time.sleep(0.3)
    (out_dir / "second").write_text("2")
    with open(out_dir.parent / "build_count", "a") as count:
        count.write("x")


def build_and_read(target: str, stamp: str) -> list[str]:
    built = load_conftest().build_cached(Path(target), stamp, slow_build)
    return sorted(path.name for path in built.iterdir())


def test_concurrent_builds_run_once_and_publish_complete_dirs(tmp_path):
    target = tmp_path / "model"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        listings = pool.starmap(build_and_read, [(str(target), "stamp-a")] * 2)
    assert listings == [[".build_stamp", "first", "second"]] * 2
    assert (tmp_path / "build_count").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["build_count", "model"]


def test_changed_stamp_rebuilds(tmp_path):
    conftest = load_conftest()
    target = tmp_path / "model"
    conftest.build_cached(target, "stamp-a", slow_build)
    conftest.build_cached(target, "stamp-a", slow_build)
    assert (tmp_path / "build_count").read_text() == "x"
    conftest.build_cached(target, "stamp-b", slow_build)
    assert (tmp_path / "build_count").read_text() == "xx"
    assert (target / ".build_stamp").read_text() == "stamp-b"
