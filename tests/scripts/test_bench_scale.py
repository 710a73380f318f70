"""scripts/bench_scale.py: the synthetic documents, the projection of the paper's job, and (slow) a whole
run at small scale."""
import json

import pytest
import torch
from script_loader import load_script


def test_synthetic_rows_are_reproducible_with_the_documented_spectrum():
    bench = load_script("bench_scale")
    power = bench.Synthetic(columns=256)
    assert torch.equal(power.rows(64, 5), power.rows(64, 5)) and not torch.equal(power.rows(64, 5), power.rows(0, 5))
    rows = power.rows(0, 8000)
    eig = torch.linalg.eigvalsh((rows.T.double() @ rows.double()) / rows.shape[0]).flip(0)
    assert 7 < float(eig[0] / eig[9]) < 14  # eigenvalues ~ 1/j: the 10th is a tenth of the first
    flat = bench.Synthetic(columns=256, spectrum="isotropic").rows(0, 8000)
    eig = torch.linalg.eigvalsh((flat.T.double() @ flat.double()) / flat.shape[0]).flip(0)
    assert float(eig[0] / eig[9]) < 1.5


def test_the_projection_of_the_papers_job_adds_up():
    bench = load_script("bench_scale")
    p = bench.projection({"gflops": 50.0})
    assert p["linear_layers"] == 224 and p["documents"] == 976_562
    assert 2.9e10 < p["flops_per_token_cache_step"] < 3.3e10  # 4 x ~7.5e9 GEMM parameters + attention
    cli = p["defaults"]["cli (k=256, float32)"]
    assert cli["columns_per_document"] == 224 * 256
    assert cli["store_tb"] == pytest.approx(976_562 * 224 * 256 * 4 / 1e12)
    assert cli["1xH200_hours"]["cache"] == pytest.approx(8 * cli["8xH200_hours"]["cache"])
    big = p["defaults"]["attributor (k=4096, bfloat16)"]
    assert big["store_tb"] == pytest.approx(976_562 * 224 * 4096 * 2 / 1e12)
    assert p["measured"]["cpu_exact_top_k_gflops_this_machine"] == 50.0
    assert {"h200_bf16_dense_tflops", "model_flops_utilization_cache", "read_gb_per_s_per_node"} <= set(p["assumed"])


@pytest.mark.slow
def test_a_whole_run_at_small_scale(tmp_path, capsys):
    pytest.importorskip("faiss")
    report = load_script("bench_scale").main(["--sizes", "3000", "--queries", "20", "--factory", "IVF16,Flat", "--nprobe", "16",
                                              "--root", str(tmp_path), "--out", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text()) == report
    entry = report["sizes"]["3000"]
    assert entry["write"]["documents"] == 3000 and entry["write"]["shards"] == 47
    assert entry["exact"]["vmhwm_mib"] > 0 and entry["exact"]["seconds"] > 0
    assert entry["index"]["queries"]["cold"]["recall@10"] >= 0.9  # every list probed, Flat codes
    assert all(r["indices_equal_to_1_rank"] or r["values_max_abs_diff"] < 1e-4 for r in entry["ranks_2"]["comparison"])
    assert not (tmp_path / "store_power_3000").exists()  # deleted unless --keep
