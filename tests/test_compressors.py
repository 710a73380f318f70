import json

import numpy as np
import pytest
import torch

import grass_ops
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


def whitened(inner=None, m_in=5, m_out=3):
    """A Whitened compressor of an 8 x 8 layer: orthonormal bases of m_in / m_out columns, a positive scale."""
    gen = torch.Generator().manual_seed(4)
    q_in = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0][:, :m_in]
    q_out = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0][:, :m_out]
    scale = torch.rand(m_in, m_out, generator=gen, dtype=torch.float64) + 0.5
    return C.Whitened(inner or C.SJLT(m_in * m_out, 6, seed=2), q_in.float(), q_out.float(), scale.float())


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


@pytest.mark.parametrize("make", [FLAT[7], FLAT[8], whitened, lambda: whitened(C.Identity(64), 8, 8)],
                         ids=["factgrass", "logra", "whitened", "whitened_full"])
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


ALL = FLAT + [lambda: C.SelectiveMask(64, indices=torch.tensor([3, 9, 40])),
              lambda: C.GraSS(64, 8, 16, s=2, seed=1, mask=C.SelectiveMask(64, indices=torch.arange(0, 64, 4))),
              whitened]


@pytest.mark.parametrize("make", ALL, ids=IDS + ["selective_mask", "grass_selective", "whitened"])
def test_compressors_work_under_inference_mode(make):
    """Inference tensors have no version counter: hashes made (or moved) under inference_mode are
    validated at every call instead of cached ("Inference tensors do not track version counter")."""
    g = torch.randn(4, make().in_features, dtype=torch.float64)
    expected = make()(g)
    outside = make()
    with torch.inference_mode():
        inside = make()
        torch.testing.assert_close(inside(g), expected)
        torch.testing.assert_close(inside(g), expected)  # a second call: nothing stale cached
        torch.testing.assert_close(outside(g), expected)
        if isinstance(inside, C.FactorizedCompressor):
            x_in, g_out = torch.randn(2, 3, inside.d_in), torch.randn(2, 3, inside.d_out)
            torch.testing.assert_close(inside(x_in, g_out), outside(x_in, g_out))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: C.SJLT(64, 16.5), TypeError, "k must be an int, got float 16.5"),
        (lambda: C.SJLT(64, True), TypeError, "k must be an int, got bool True"),
        (lambda: C.SJLT(0, 4), ValueError, r"p must be an int in \[1, "),
        (lambda: C.Identity(64.0), TypeError, "p must be an int, got float"),
        (lambda: C.RandomMask(64, 2**63), ValueError, r"k must be an int in \[1, 2\*\*63 - 1 \(int64\)\]"),
        (lambda: C.GraSS(64, 8, 16.0), TypeError, "k_prime must be an int"),
        (lambda: C.FactGraSS(8, 8, 16, 4.5, 6), TypeError, "k_in must be an int"),
        (lambda: C.FactGraSS(8, 8, True, 4, 6), TypeError, "k must be an int, got bool"),
        (lambda: C.Gaussian(64, 2**64), ValueError, r"k must be an int in \[1, 2\*\*63 - 1"),
        (lambda: C.Rademacher(64, 4, seed=1.5), TypeError, "seed must be an int"),
        (lambda: C.FJLT(0, 4), ValueError, r"p must be an int in \[1, "),
        (lambda: C.LoGra(8, 8, 2, False), TypeError, "k_out must be an int, got bool"),
        (lambda: C.SelectiveMask(12.0, indices=torch.tensor([1])), TypeError, "p must be an int"),
        (lambda: C.SelectiveMask(12, indices=torch.tensor([[1, 2]])), ValueError, "indices must be a 1-D integer tensor"),
        (lambda: C.SelectiveMask(12, indices=torch.tensor([1.0, 2.0])), ValueError, "indices must be a 1-D integer tensor"),
    ],
)
def test_constructor_arguments_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _write_mask(path, indices, metadata):
    np.savez(path, indices=np.asarray(indices), metadata=np.array(json.dumps(metadata)))
    return path


@pytest.mark.parametrize(
    "indices, metadata, match",
    [
        ([[1, 2], [3, 4]], {"p": 12, "k": 4}, r"indices must be a 1-D integer array, got shape \(2, 2\)"),
        ([1.0, 2.5], {"p": 12, "k": 2}, "indices must be a 1-D integer array, got shape .* dtype float64"),
        ([1, 2, 3], {"p": 12, "k": 4}, "metadata says k=4 but the file holds 3 indices"),
        ([1, 2, 30], {"p": 12, "k": 3}, r"indices must lie in \[0, p=12\) as its metadata says, got values in \[1, 30\]"),
        ([1, 2], {"p": "12", "k": 2}, "metadata 'p' must be an int, got '12'"),
        ([1, 2], {"k": 2}, "metadata 'p' must be an int, got None"),
        ([1, 2], [12, 2], "metadata must be a JSON object"),
    ],
)
def test_selective_mask_file_contents_are_checked(tmp_path, indices, metadata, match):
    path = _write_mask(tmp_path / "mask.npz", indices, metadata)
    with pytest.raises(ValueError, match=f"{tmp_path}.*mask.npz.*{match}"):
        C.SelectiveMask(12, path=path)


def test_unreadable_selective_mask_file_is_named(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad.npz is not a readable selective mask file"):
        C.SelectiveMask(12, path=tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match=r"other.npz is not a readable selective mask file: needs the arrays"):
        C.SelectiveMask(12, path=tmp_path / "other.npz")


@pytest.mark.parametrize("make", ALL, ids=IDS + ["selective_mask", "grass_selective", "whitened"])
def test_adjoint_is_the_transpose(make):
    """<C g, z> = <g, C^T z> for random g and z, and the adjoint's vector-Jacobian product is C itself."""
    comp = make()
    g = torch.randn(3, comp.in_features, dtype=torch.float64)
    z = torch.randn(3, comp.out_features, dtype=torch.float64, requires_grad=True)
    adjoint = comp.adjoint(z)
    assert adjoint.shape == (3, comp.in_features)
    torch.testing.assert_close((comp(g) * z).sum(), (g * adjoint).sum())
    (vjp,) = torch.autograd.grad(adjoint, z, g)
    torch.testing.assert_close(vjp, comp(g))


@pytest.mark.parametrize("two_d", [False, True], ids=["tokens", "one_token"])
@pytest.mark.parametrize("make", [FLAT[7], FLAT[8], lambda: C.FactGraSS(8, 8, 16, 4, 6, seed=5, s=3), whitened],
                         ids=["factgrass", "logra", "factgrass_s3", "whitened"])
def test_sketch_output_differentiates_to_compress_factors(make, two_d):
    """The output is y itself, and d/dz <g_out, sketch_output(y, x_in, z)> = compress_factors(x_in, g_out)."""
    comp = make()
    shape = (3,) if two_d else (3, 5)
    x_in = torch.randn(*shape, comp.d_in, dtype=torch.float64)
    y = torch.randn(*shape, comp.d_out, dtype=torch.float64)
    g_out = torch.randn(*shape, comp.d_out, dtype=torch.float64)
    z = torch.zeros(3, comp.out_features, dtype=torch.float64, requires_grad=True)
    out = comp.sketch_output(y if not two_d else y.unsqueeze(1), x_in, z)
    torch.testing.assert_close(out.reshape(y.shape), y)
    (grad_z,) = torch.autograd.grad(out, z, g_out.reshape(out.shape))
    torch.testing.assert_close(grad_z, comp.compress_factors(x_in, g_out))


def test_whitened_is_the_inner_compression_of_the_rotated_scaled_gradient():
    """compress(G) = inner(vec((B_in^T G B_out) * S)); identity bases and scale give the inner compressor itself."""
    comp = whitened()
    g = torch.randn(4, 64, dtype=torch.float64)
    b_in, b_out, scale = comp.in_basis.double(), comp.out_basis.double(), comp.scale.double()
    expected = comp.inner(((b_in.T @ g.view(4, 8, 8) @ b_out) * scale).flatten(1))
    torch.testing.assert_close(comp(g), expected)
    plain = C.Whitened(C.SJLT(64, 6, seed=2), torch.eye(8), torch.eye(8), torch.ones(8, 8))
    torch.testing.assert_close(plain(g), C.SJLT(64, 6, seed=2)(g))
    compiled = torch.compile(comp.compress_factors, fullgraph=True)
    x_in, g_out = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(compiled(x_in, g_out), comp.compress_factors(x_in, g_out))


def test_whitened_records_a_digest_of_its_bases_and_refuses_to_rebuild_without_them():
    spec = whitened().spec()
    assert spec["inner"] == C.SJLT(15, 6, seed=2).spec() and len(spec["basis_digest"]) == 64
    assert whitened().spec() == spec and whitened(m_in=4).spec()["basis_digest"] != spec["basis_digest"]
    with pytest.raises(ValueError, match="bases are data"):
        C.from_spec(json.loads(json.dumps(spec)))


@pytest.mark.parametrize("args, match", [
    ((C.SJLT(12, 4), torch.eye(8)[:, :3], torch.eye(8)[:, :4], torch.ones(4, 3)), "scale must be"),
    ((C.SJLT(10, 4), torch.eye(8)[:, :3], torch.eye(8)[:, :4], torch.ones(3, 4)), "inner takes 10 inputs"),
    ((C.SJLT(12, 4), torch.eye(8)[:, :3], torch.eye(8)[:, :4], torch.full((3, 4), float("nan"))), "scale must be a finite"),
    ((C.SJLT(12, 4), torch.ones(8), torch.eye(8)[:, :4], torch.ones(3, 4)), "must be matrices"),
])
def test_whitened_arguments_are_checked(args, match):
    with pytest.raises(ValueError, match=match):
        C.Whitened(*args)


def test_an_sjlt_keeps_int32_indices_and_projects_as_with_int64_ones():
    from grass_ops._hashing import sjlt_hash
    from grass_ops.ops.sjlt import signed_buckets

    comp = C.SJLT(1000, 17, 2, seed=3)
    idx, sign = sjlt_hash(1000, 17, 2, 3)
    assert comp.idx.dtype == torch.int32 and torch.equal(comp.idx.long(), idx) and torch.equal(comp.sign, sign)
    x = torch.randn(5, 1000, dtype=torch.float64)
    assert torch.equal(comp(x), grass_ops.sjlt(x, idx, sign, 17))  # bit for bit
    assert signed_buckets(comp.idx, comp.sign, 17).dtype == torch.int64  # the scatter's indices stay int64: fast
    z = torch.randn(5, 17, dtype=torch.float64)
    assert torch.equal(comp.adjoint(z), grass_ops.sjlt_transpose(z, idx, sign))
