#!/usr/bin/env python
"""Ahead-of-time compile every Triton kernel of grass_ops/cuda for real GPU targets, with no GPU.

    python scripts/compile_kernels.py --sm 80 90            # every variant, sm_80 and sm_90
    python scripts/compile_kernels.py --sm 90 --json k.json # also write the table as JSON
    python scripts/compile_kernels.py --sm 80 --module-file extra.py --only broken "ordered torch.float32 base"

For each variant in the kernel modules' ``AOT_VARIANTS`` tables (grass_ops/cuda/<op>_triton.py: every
dtype, index dtype, constexpr block size and integer-argument class the launchers can produce), it
reproduces the specialization a launch would make (Triton's own binder and ``_pack_args``), builds
``triton.compiler.ASTSource(fn, signature, constexprs, attrs)`` and runs
``triton.compile(src, target=GPUTarget("cuda", sm, 32), options=...)``: Triton lowers it to PTX and
its bundled ptxas to cubin, so register-allocation, shared-memory and dot-shape errors show here as
they would on the GPU. One line per compile (registers, spill bytes, shared memory, seconds), then
``N/M compiled``; the exit status is non-zero on any failure, and when a ``@triton.jit`` kernel of
grass_ops/cuda is in no table. Needs triton (3.6 or 3.7) and no TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _environment() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_kernels.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    if "TRITON_CACHE_DIR" not in os.environ:  # compile for real, not from an earlier run's cache
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="grass_aot_cache_")
    sys.path.insert(0, str(ROOT))


def load_tables(module_files: list[str]) -> tuple[list, list[str]]:
    """(variants of every table in grass_ops/cuda and the extra files, names of uncovered kernels)."""
    import triton

    import grass_ops.cuda as cuda_package

    modules = [importlib.import_module(f"grass_ops.cuda.{m.name}") for m in pkgutil.iter_modules(cuda_package.__path__)]
    for i, path in enumerate(module_files):
        spec = importlib.util.spec_from_file_location(f"_aot_extra_{i}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    variants = [v for module in modules for v in getattr(module, "AOT_VARIANTS", [])]
    tabled = {id(v.kernel) for v in variants}
    uncovered = [f"{module.__name__}.{name}" for module in modules for name, obj in vars(module).items()
                 if isinstance(obj, triton.runtime.JITFunction) and obj.__module__ == module.__name__ and id(obj) not in tabled]
    return variants, uncovered


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def specialize(kernel, args: tuple, kwargs: dict, backend):
    """(options, signature, constexprs, attrs) exactly as ``JITFunction.run`` would make them for this launch."""
    import triton
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug)
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def compile_one(variant, sm: int) -> dict:
    """Compile one variant for sm_<sm>; a dict with the resources, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", sm, 32)
    row = {"sm": sm, "kernel": variant.kernel.__name__, "variant": variant.label}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        backend = make_backend(target)
        options, signature, constexprs, attrs = specialize(
            variant.kernel, variant.args, dict(variant.constexprs, num_warps=variant.num_warps), backend)
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output: registers, spills
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(variant.kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        text = log.getvalue()
        for key, pattern in _PTXAS.items():
            found = pattern.findall(text)
            row[key] = max(map(int, found)) if found else None
        row["shared_bytes"] = compiled.metadata.shared
        row["num_warps"] = compiled.metadata.num_warps
        row["cubin_bytes"] = len(compiled.asm["cubin"])
        row["ok"] = True
    except Exception as error:  # a compile error is a result: reported, counted, and the exit status
        row["ok"] = False
        row["error"] = f"{type(error).__name__}: " + " | ".join(str(error).strip().splitlines()[-6:])
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


_VARIANTS: list = []


def _work(job: tuple[int, int]) -> dict:
    index, sm = job
    return compile_one(_VARIANTS[index], sm)


def _describe(row: dict) -> str:
    head = f"sm_{row['sm']} {row['variant']}"
    if not row["ok"]:
        return f"FAILED {head}: {row['error']}"
    return (f"ok {head}: {row['registers']} registers, spills {row['spill_stores']}/{row['spill_loads']} B (store/load), "
            f"stack {row['stack']} B, shared {row['shared_bytes']} B, {row['seconds']:.2f} s")


def summary(rows: list[dict]) -> list[dict]:
    """Per (kernel, sm): variants, max registers, max spill bytes, max shared memory, compile seconds."""
    out = {}
    for r in rows:
        s = out.setdefault((r["kernel"], r["sm"]), {"kernel": r["kernel"], "sm": r["sm"], "variants": 0, "failed": 0,
                                                     "max_registers": 0, "max_spill_bytes": 0, "max_shared_bytes": 0,
                                                     "seconds": 0.0})
        s["variants"] += 1
        s["seconds"] = round(s["seconds"] + r["seconds"], 2)
        if not r["ok"]:
            s["failed"] += 1
            continue
        s["max_registers"] = max(s["max_registers"], r["registers"] or 0)
        s["max_spill_bytes"] = max(s["max_spill_bytes"], (r["spill_stores"] or 0) + (r["spill_loads"] or 0))
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r["shared_bytes"] or 0)
    return list(out.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sm", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100, 90 = H100/H200)")
    parser.add_argument("--module-file", action="append", default=[], help="also compile the AOT_VARIANTS of this file")
    parser.add_argument("--only", nargs="+", default=None, help="compile only the variants whose label contains one of these")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    parser.add_argument("--json", default=None, help="write every compile's row and the per-kernel summary here")
    args = parser.parse_args(argv)
    _environment()
    import triton

    variants, uncovered = load_tables(args.module_file)
    if args.only:
        variants = [v for v in variants if any(text in v.label for text in args.only)]
    _VARIANTS[:] = variants
    jobs = [(i, sm) for sm in args.sm for i in range(len(variants))]
    print(f"triton {triton.__version__}: {len(variants)} variants x sm {args.sm} = {len(jobs)} compiles, {args.jobs} jobs",
          flush=True)
    start = time.perf_counter()
    rows = []
    if args.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for row in pool.imap(_work, jobs):
                rows.append(row)
                print(_describe(row), flush=True)
    else:
        for job in jobs:
            rows.append(_work(job))
            print(_describe(rows[-1]), flush=True)
    wall = time.perf_counter() - start
    table = summary(rows)
    for s in table:
        print(f"summary sm_{s['sm']} {s['kernel']}: {s['variants']} variants, {s['failed']} failed, max {s['max_registers']} "
              f"registers, max spills {s['max_spill_bytes']} B, max shared {s['max_shared_bytes']} B, {s['seconds']:.1f} s compiling")
    for name in uncovered:
        print(f"UNCOVERED {name}: a @triton.jit kernel in no AOT_VARIANTS table (add its launcher's variants)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "sm": args.sm, "wall_seconds": round(wall, 1),
                                               "uncovered": uncovered, "summary": table, "compiles": rows}, indent=1))
    compiled = sum(r["ok"] for r in rows)
    print(f"wall {wall:.1f} s, {len(uncovered)} uncovered kernels")
    print(f"{compiled}/{len(rows)} compiled")
    return 0 if compiled == len(rows) and rows and not uncovered else 1


if __name__ == "__main__":
    sys.exit(main())
