"""scripts/timed.py (what run_demo.sh and test.sh end with): the command's wall time, its peak RSS and its exit status."""
import re
import subprocess
import sys
from pathlib import Path

TIMED = Path(__file__).resolve().parents[2] / "scripts" / "timed.py"


def _timed(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TIMED), "job", "--", *command], capture_output=True, text=True)


def test_timed_reports_wall_time_peak_memory_and_the_status():
    held = 400  # MiB the child holds
    done = _timed(sys.executable, "-c", f"import time; x = bytearray({held} * 2**20); x[::4096] = b'1' * len(x[::4096]); "
                                        "time.sleep(1.1)")
    assert done.returncode == 0
    found = re.fullmatch(r"job: (\d+) s wall, peak RSS (\d+\.\d\d) GiB \(exit status 0\)\n", done.stderr)
    assert found, done.stderr
    assert int(found.group(1)) >= 1 and held / 1024 <= float(found.group(2)) < held / 1024 + 0.5
    failed = _timed(sys.executable, "-c", "raise SystemExit(3)")
    assert failed.returncode == 3 and "(exit status 3)" in failed.stderr
    assert _timed().returncode == 2  # no command: usage


RSS_TRACE = TIMED.parent / "rss_trace.py"


def test_rss_trace_samples_the_child_and_reports_its_peak_and_status(tmp_path):
    import json

    held, trace = 300, tmp_path / "trace.tsv"  # MiB the child holds for a second
    child = f"import time; x = bytearray({held} * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.0)"
    done = subprocess.run([sys.executable, str(RSS_TRACE), "--out", str(trace), "--interval", "0.1", "--",
                           sys.executable, "-c", child], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [line.split("\t") for line in trace.read_text().splitlines()]
    assert len(rows) >= 5 and all(float(b[0]) > float(a[0]) for a, b in zip(rows, rows[1:]))
    assert held <= summary["peak_rss_mib"] < held + 200 and summary["status"] == 0
    assert max(int(r[1]) for r in rows) == round(summary["peak_rss_mib"])
    failed = subprocess.run([sys.executable, str(RSS_TRACE), "--out", str(trace), "--", sys.executable, "-c",
                             "raise SystemExit(3)"], capture_output=True, text=True)
    assert failed.returncode == 3
