import importlib.util
import json
from pathlib import Path

import pytest
import torch

from attribution.evaluation.lds import LDSHarness, cross_validated_lds


def _linear_datamodel(tmp_path, n_train=40, n_test=8, n_models=30):
    """Outputs that are exactly linear in the subset: LDS of the true weights must be ~1."""
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(n_test, n_train, generator=gen, dtype=torch.float64)

    class Model(torch.nn.Module):
        def __init__(self, indices):
            super().__init__()
            self.register_buffer("member", torch.zeros(n_train, dtype=torch.float64).index_fill_(0, indices, 1.0))

    calls = []

    def train_fn(indices, seed):
        calls.append(seed)
        return Model(indices)

    harness = LDSHarness(tmp_path, n_train, train_fn, lambda m: weights @ m.member, n_models=n_models, progress=False)
    return harness, weights, calls


def test_lds_of_true_and_random_scores(tmp_path):
    harness, weights, calls = _linear_datamodel(tmp_path)
    assert harness.score(weights).mean > 0.999
    random_scores = torch.randn(weights.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    assert abs(harness.score(random_scores).mean) < 0.2
    assert harness.score(-weights).mean < -0.999
    assert len(calls) == 30 and harness.subsets().sum(1).eq(20).all()


def test_retrained_models_are_reused_and_config_is_checked(tmp_path):
    harness, weights, calls = _linear_datamodel(tmp_path)
    harness.outputs()
    again, _, calls_again = _linear_datamodel(tmp_path)
    again.outputs()
    assert calls_again == []  # everything came from disk
    assert (tmp_path / "model_000.npz").exists()
    with pytest.raises(ValueError, match="different configuration"):
        LDSHarness(tmp_path, 40, None, None, n_models=31)


def test_damping_is_cross_validated(tmp_path):
    harness, weights, _ = _linear_datamodel(tmp_path)
    noisy = weights + 3 * torch.randn(weights.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    result = cross_validated_lds(harness, lambda d: weights if d == 1.0 else noisy, n_test=8, grid=(0.1, 1.0, 10.0))
    assert result["damping"] == 1.0 and result["lds"] > 0.99 and result["n_test"] == 7


def test_lds_script_quick(tmp_path):
    path = Path(__file__).resolve().parents[2] / "scripts" / "lds.py"
    spec = importlib.util.spec_from_file_location("lds_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--out", str(tmp_path), "--quick"])
    assert json.loads((tmp_path / "lds.json").read_text())["quick"] is True
    assert {c["method"] for c in report["cells"]} == set(module.METHODS)
    assert {c["backbone"] for c in report["cells"]} == {"TRAK", "IF"}
    for cell in report["cells"]:
        assert -1 <= cell["lds"] <= 1 and cell["compression_seconds"] > 0 and cell["damping"] in report["damping_grid"]
    # real attributions carry signal: every TRAK cell's LDS is clearly positive
    assert min(c["lds"] for c in report["cells"] if c["backbone"] == "TRAK") > 0.1
    assert "| SJLT |" in (tmp_path / "lds.md").read_text()
