import json
import os
import socket
import subprocess
import sys

import pytest

from grass_ops.atomic_files import atomic_writer, commit_tmp, write_bytes_atomic, write_json_atomic, write_text_atomic
from grass_ops.atomic_files import tmp_path as tmp_path_of


def test_writes_replace_the_file(tmp_path):
    p = tmp_path / "f.bin"
    write_bytes_atomic(p, b"one")
    write_bytes_atomic(p, b"two")
    assert p.read_bytes() == b"two"
    write_text_atomic(p, "three")
    assert p.read_text() == "three"
    write_json_atomic(p, {"a": 1}, sort_keys=True)
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_crash_in_the_middle_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    p = tmp_path / "f.bin"
    write_bytes_atomic(p, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(p) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_fresh_process_reads_what_another_wrote(tmp_path):
    p = tmp_path / "f.json"
    code = f"from grass_ops.atomic_files import write_json_atomic; write_json_atomic({str(p)!r}, [1, 2, 3])"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert json.loads(p.read_text()) == [1, 2, 3]


def test_the_tmp_file_has_the_recognisable_name_beside_the_target(tmp_path):
    p = tmp_path / "sub" / "f.json"
    assert tmp_path_of(p) == tmp_path / "sub" / f".f.json.tmp-{socket.gethostname()}-{os.getpid()}"
    p.parent.mkdir()
    with atomic_writer(p) as f:
        f.write(b"x")
        assert os.listdir(p.parent) == [tmp_path_of(p).name]  # written there, renamed on exit
    assert os.listdir(p.parent) == ["f.json"] and p.read_bytes() == b"x"


def test_files_get_the_permissions_of_a_plain_write(tmp_path):
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    plain.write_bytes(b"x")
    write_bytes_atomic(atomic, b"x")
    assert atomic.stat().st_mode == plain.stat().st_mode


def test_text_mode_and_a_leftover_tmp_of_a_killed_writer(tmp_path):
    p = tmp_path / "f.txt"
    tmp_path_of(p).write_bytes(b"a killed writer's partial file, longer than the new content")
    with atomic_writer(p, "w") as f:
        f.write("new")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_commit_tmp_renames_a_filled_tmp_into_place(tmp_path):
    p = tmp_path / "m.npy"
    p.write_bytes(b"old")
    tmp = tmp_path_of(p)
    with open(tmp, "wb") as f:  # filled another way (positioned writes, several writers), then closed
        f.write(b"new")
    fd = os.open(tmp, os.O_WRONLY)
    os.pwrite(fd, b"N", 0)
    os.close(fd)
    commit_tmp(tmp, p)
    assert p.read_bytes() == b"New" and os.listdir(tmp_path) == ["m.npy"]


def test_a_failed_commit_keeps_the_old_file_and_removes_the_tmp(tmp_path, monkeypatch):
    p = tmp_path / "m.npy"
    p.write_bytes(b"old")
    tmp = tmp_path_of(p)
    tmp.write_bytes(b"new")

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        commit_tmp(tmp, p)
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.npy"]
    with pytest.raises(FileNotFoundError):
        commit_tmp(tmp, p)  # nothing to commit: the target is left alone
    assert p.read_bytes() == b"old"


def test_a_raising_writer_of_a_new_file_leaves_nothing(tmp_path):
    p = tmp_path / "new.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(p) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_fresh_process_reads_a_committed_tmp_another_filled(tmp_path):
    p = tmp_path / "m.bin"
    code = ("import sys; from grass_ops.atomic_files import commit_tmp, tmp_path; "
            "t = tmp_path(sys.argv[1]); open(t, 'wb').write(b'filled'); commit_tmp(t, sys.argv[1])")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, env=env)
    assert p.read_bytes() == b"filled" and os.listdir(tmp_path) == ["m.bin"]
    out = subprocess.run([sys.executable, "-c", f"print(open({str(p)!r}, 'rb').read())"], check=True, env=env,
                         capture_output=True, text=True).stdout
    assert out.strip() == "b'filled'"
