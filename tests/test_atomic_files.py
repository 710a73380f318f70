import json
import os
import subprocess
import sys

import pytest

from grass_ops.atomic_files import atomic_writer, write_bytes_atomic, write_json_atomic, write_text_atomic


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
