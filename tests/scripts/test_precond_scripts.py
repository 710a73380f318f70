"""scripts/lm_lds.py and scripts/lds_precond.py --quick end to end, and their resumption."""
import json

import pytest
from script_loader import load_script


@pytest.mark.slow
def test_lm_lds_quick_runs_and_resumes(tmp_path):
    module = load_script("lm_lds")
    report = module.main(["--out", str(tmp_path), "--quick"])
    assert {(c["compressor"], c["preconditioner"]) for c in report["cells"]} == {
        (c, p) for c in module.COMPRESSORS for p in module.PRECONDITIONERS}
    for cell in report["cells"]:
        assert -1 <= cell["lds"] <= 1 and cell["damping"] in report["damping_grid"] and cell["n_test"] == 36
    assert report["test_loss_per_token"] < 4.0  # trained: the uniform guess over ~100 characters is 4.6
    again = module.main(["--out", str(tmp_path), "--quick"])  # every cell, model and retrained output is reused
    assert again["cells"] == report["cells"] and again["retrain_seconds_this_run"] < 1.0
    assert "| sjlt | 64 |" in (tmp_path / "lm_lds_quick.md").read_text()
    assert json.loads((tmp_path / "lm_lds_quick.json").read_text())["quick"] is True


@pytest.mark.slow
def test_lds_precond_quick(tmp_path):
    pytest.importorskip("sklearn")
    module = load_script("lds_precond")
    report = module.main(["--out", str(tmp_path), "--quick"])
    cells = {(c["compressor"], c["preconditioner"]): c for c in report["cells"]}
    assert set(cells) == {("exact", "kfac"), ("exact", "ekfac")} | {(c, p) for c in module.COMPRESSORS
                                                                     for p in module.PRECONDITIONERS}
    for cell in cells.values():
        assert set(cell["by_damping"]) == set(report["damping_grid"])
    # uncompressed, the Kronecker preconditioners carry a clear signal
    assert cells[("exact", "ekfac")]["lds"] > 0.2
