import os
import subprocess
import sys

import pytest

from lorakit.atomic import TEMP_PREFIX, atomic_dir, atomic_write_text, remove_leftovers


def test_new_directory_appears_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists() and tmp.parent == tmp_path and tmp.name.startswith(TEMP_PREFIX)
    assert (target / "a.txt").read_text() == "a"
    assert os.listdir(tmp_path) == ["out"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_existing_directory_is_replaced_as_a_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_an_error_keeps_the_old_directory_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert sorted(os.listdir(target)) == ["old.txt"] and os.listdir(tmp_path) == ["out"]


def test_refuses_to_replace_when_asked_not_to(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(tmp_path / "out", replace=False):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file"):
        with atomic_dir(tmp_path / "file"):
            pass


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "f.json", "{}")
    atomic_write_text(tmp_path / "f.json", "[]")
    assert (tmp_path / "f.json").read_text() == "[]" and os.listdir(tmp_path) == ["f.json"]


def test_leftovers_of_dead_processes_are_removed(tmp_path):
    code = ("import os, sys; from lorakit.atomic import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as t:\n    (t / 'x').write_text('x'); os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], check=False)
    left = [p for p in os.listdir(tmp_path) if p.startswith(TEMP_PREFIX)]
    assert len(left) == 1 and not (tmp_path / "out").exists()
    mine = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-abcd-live"
    mine.mkdir()  # a writer still running keeps its folder
    assert [p.name for p in remove_leftovers(tmp_path)] == left
    assert os.listdir(tmp_path) == [mine.name]


def test_discard_removes_files_and_directories_leaving_nothing(tmp_path):
    from lorakit.atomic import discard

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    (tmp_path / "f").write_text("f")
    discard(tmp_path / "d")
    discard(tmp_path / "f")
    assert os.listdir(tmp_path) == []
