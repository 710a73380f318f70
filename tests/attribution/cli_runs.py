"""Runs of `grass-attribute` for the tests: under torchrun with 2 gloo ranks, in a fresh process, and in this process
with the ranks' thread count (so that their gradients and scores can be compared bitwise)."""
import json
import os
import subprocess
import sys

import torch

from attribution.llm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **extra}


def torchrun(*args) -> list[dict]:
    """`torchrun --nproc_per_node 2 -m attribution.llm.cli ARGS` (one thread per rank); its printed JSON lines."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "attribution.llm.cli", *args], env=_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def fresh_process(*args) -> subprocess.CompletedProcess:
    """`python -m attribution.llm.cli ARGS` in a new process (its exit status is not checked)."""
    return subprocess.run([sys.executable, "-m", "attribution.llm.cli", *args], env=_env(), capture_output=True,
                          text=True, timeout=300)


def single(*args):
    """cli.run(ARGS) in this process with one thread, as each torchrun rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.run(list(args))
    finally:
        torch.set_num_threads(threads)
