import json

import pytest
import torch

from grass_ops import compressors as C

FLAT = [
    lambda: C.Identity(64),
    lambda: C.SJLT(64, 16, 2, seed=3),
    lambda: C.RandomMask(64, 16, seed=3),
    lambda: C.GraSS(64, 16, 32, seed=3),
    lambda: C.Gaussian(64, 16, seed=3),
    lambda: C.Rademacher(64, 16, seed=3),
    lambda: C.FJLT(64, 16, seed=3),
    lambda: C.FactGraSS(8, 8, 16, 4, 6, seed=3),
    lambda: C.LoGra(8, 8, 4, 4, seed=3),
]
IDS = ["identity", "sjlt", "random_mask", "grass", "gaussian", "rademacher", "fjlt", "factgrass", "logra"]


@pytest.mark.parametrize("make", FLAT, ids=IDS)
def test_spec_roundtrip_and_determinism(make):
    comp = make()
    spec = comp.spec()
    rebuilt = C.from_spec(json.loads(json.dumps(spec)))
    g = torch.randn(5, comp.in_features, dtype=torch.float64)
    out = comp(g)
    assert out.shape == (5, comp.out_features)
    torch.testing.assert_close(rebuilt(g), out)
    torch.testing.assert_close(make()(g), out)


@pytest.mark.parametrize("make", FLAT[1:], ids=IDS[1:])
def test_seed_changes_the_projection(make):
    comp = make()
    spec = {**comp.spec(), "seed": comp.spec()["seed"] + 1}
    g = torch.randn(3, comp.in_features, dtype=torch.float64)
    assert not torch.allclose(C.from_spec(spec)(g), comp(g))


@pytest.mark.parametrize("make", [FLAT[1], FLAT[4], FLAT[5], FLAT[6]], ids=["sjlt", "gaussian", "rademacher", "fjlt"])
def test_projections_preserve_norm_in_expectation(make):
    """E||Pg||^2 = ||g||^2: average over 200 seeds within 4 standard errors."""
    g = torch.randn(64, dtype=torch.float64)
    spec = make().spec()
    ratios = torch.tensor([float(C.from_spec({**spec, "seed": s})(g).norm() ** 2) for s in range(200)])
    ratios = ratios / float(g.norm() ** 2)
    assert abs(float(ratios.mean()) - 1) < 4 * float(ratios.std()) / 200**0.5


@pytest.mark.parametrize("make", [FLAT[7], FLAT[8]], ids=["factgrass", "logra"])
def test_factor_path_equals_full_gradient_path(make):
    comp = make()
    x_in = torch.randn(3, 5, comp.d_in, dtype=torch.float64)
    g_out = torch.randn(3, 5, comp.d_out, dtype=torch.float64)
    weight_grad = torch.einsum("bti,btj->bij", x_in, g_out).flatten(1)  # = W.grad.T flattened
    torch.testing.assert_close(comp.compress_factors(x_in, g_out), comp(weight_grad))


def test_hadamard_is_orthonormal():
    x = torch.randn(4, 32, dtype=torch.float64)
    y = C.hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(C.hadamard_transform(y), x)


def test_selective_mask_save_load_and_loud_failures(tmp_path):
    path = C.SelectiveMask.save(tmp_path / "mask.npz", torch.tensor([5, 1, 9]), p=12, layer="fc1", correlation=0.9)
    mask = C.SelectiveMask(12, path=path, k=3)
    assert mask.indices.tolist() == [1, 5, 9] and mask.metadata["layer"] == "fc1"
    torch.testing.assert_close(C.from_spec(mask.spec())(torch.arange(12.0)), torch.tensor([1.0, 5.0, 9.0]))
    with pytest.raises(FileNotFoundError, match="refusing to fall back"):
        C.SelectiveMask(12, path=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="learned for p=12, not p=13"):
        C.SelectiveMask(13, path=path)
    with pytest.raises(ValueError, match="expected k=4"):
        C.SelectiveMask(12, path=path, k=4)
    with pytest.raises(ValueError, match="does not match the recorded digest"):
        C.SelectiveMask(12, path=path, digest="0" * 16)
    with pytest.raises(ValueError, match="distinct"):
        C.SelectiveMask(12, indices=torch.tensor([1, 1]))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(Exception):
        C.SelectiveMask(12, path=tmp_path / "bad.npz")


def test_factgrass_with_learned_masks_roundtrips(tmp_path):
    in_path = C.SelectiveMask.save(tmp_path / "in.npz", torch.tensor([0, 2, 5]), p=8)
    out_path = C.SelectiveMask.save(tmp_path / "out.npz", torch.tensor([1, 3]), p=6)
    comp = C.FactGraSS(8, 6, 4, 3, 2, seed=1, in_mask=C.SelectiveMask(8, path=in_path),
                       out_mask=C.SelectiveMask(6, path=out_path))
    rebuilt = C.from_spec(json.loads(json.dumps(comp.spec())))
    assert rebuilt.in_mask.indices.tolist() == [0, 2, 5]
    with pytest.raises(ValueError, match=r"mask must map 8 -> 4"):
        C.FactGraSS(8, 6, 4, 4, 2, in_mask=C.SelectiveMask(8, path=in_path))


def test_wrong_input_width_is_named():
    with pytest.raises(ValueError, match=r"Gaussian expects inputs \[..., 64\]"):
        C.Gaussian(64, 4)(torch.randn(2, 63))
    with pytest.raises(ValueError, match="unknown compressor type"):
        C.from_spec({"type": "Nope"})


def test_blocked_hadamard_equals_the_sylvester_matrix():
    x = torch.randn(3, 64, dtype=torch.float64)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < 64:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    expected = x @ sylvester / 8
    for block in (2, 4, 8, 128):
        torch.testing.assert_close(C.hadamard_transform(x, block=block), expected)
    with pytest.raises(ValueError, match="power-of-two"):
        C.hadamard_transform(torch.randn(2, 6))


@pytest.mark.parametrize("make", [FLAT[7], FLAT[8]], ids=["factgrass", "logra"])
def test_factorized_compressors_take_factors_when_called_with_two(make):
    comp = make()
    x_in, g_out = torch.randn(2, 3, comp.d_in), torch.randn(2, 3, comp.d_out)
    torch.testing.assert_close(comp(x_in, g_out), comp.compress_factors(x_in, g_out))
