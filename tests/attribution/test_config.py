"""attribution.config: AttributorConfig validates and normalizes the Attributor's arguments, and
Attributor(config=...) behaves as the keyword arguments."""
import pytest
import torch
from attribution_problems import loss_fn, make_problem

from attribution import Attributor, AttributorConfig
from attribution.config import check_int

FAST = dict(k=16, compile=False, progress=False)


def test_values_are_normalized():
    config = AttributorConfig(method="trak", output_fn=loss_fn, damping=" 0.1 * mean", autocast="bfloat16",
                              dtype=torch.float64)
    assert config.preconditioner == "fim" and config.damping == "0.1*mean" and config.autocast is torch.bfloat16
    assert config.storage == "float64" and config.gradient_kind == "output" and not config.normalized
    gradcos = AttributorConfig(method="gradcos")
    assert gradcos.preconditioner == "none" and gradcos.normalized and gradcos.gradient_kind == "loss"


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(method="influence"), ValueError, "method must be one of"),
    (dict(fisher="true"), ValueError, "needs a callable logits_fn"),
    (dict(method="trak"), ValueError, "needs a callable output_fn"),
    (dict(method="graddot", preconditioner="fim"), ValueError, "uses no preconditioner"),
    (dict(preconditioner="kfac", fisher="true", logits_fn=loss_fn), ValueError, "uses the empirical Fisher"),
    (dict(k=0), ValueError, "k must be >= 1, got 0"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(seed=-1), ValueError, "seed must be in \\[0, "),
    (dict(damping=-1.0), ValueError, "damping must be a finite number >= 0"),
    (dict(dtype=torch.float16), ValueError, "dtype must be torch.float32 or torch.float64"),
    (dict(storage_dtype="int8"), ValueError, "storage_dtype must be one of"),
    (dict(memory_budget=0), ValueError, "memory_budget must be >= 1"),
    (dict(param_chunk=True), TypeError, "param_chunk must be an int"),
    (dict(autocast="float64"), ValueError, "autocast must be None, torch.bfloat16 or torch.float16"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(method="trak", output_fn=loss_fn, normalize=True), ValueError, "normalize=True is for"),
    (dict(store=3), TypeError, "store must be None or a directory path"),
])
def test_each_argument_is_checked_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        AttributorConfig(**kwargs)


def test_a_store_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        AttributorConfig(store=tmp_path / "file")


def test_check_int_bounds():
    assert check_int("n", 3) == 3 and check_int("n", 0, 0, 1) == 0
    with pytest.raises(ValueError, match=r"n must be in \[0, 1\), got 1"):
        check_int("n", 1, 0, 1)
    with pytest.raises(TypeError, match="n must be an int, got True"):
        check_int("n", True)


def test_a_config_object_gives_the_scores_of_the_keyword_arguments():
    model, train, test = make_problem()
    keywords = Attributor(model, loss_fn, method="graddot", dtype=torch.float64, **FAST).cache(train)
    config = AttributorConfig(method="graddot", dtype=torch.float64, **FAST)
    configured = Attributor(model, loss_fn, config=config).cache(train)
    assert configured.config == config and configured.method == "graddot"
    assert torch.equal(configured.attribute(test), keywords.attribute(test))
    configured.damping = 0.5  # its own copy: the config object and other Attributors built from it keep theirs
    assert config.damping == 1e-3 and Attributor(model, loss_fn, config=config).damping == 1e-3


def test_a_config_and_other_arguments_are_refused():
    model, _, _ = make_problem()
    with pytest.raises(ValueError, match=r"give config= or keyword arguments, not both \(also given: \['k'\]\)"):
        Attributor(model, loss_fn, k=8, config=AttributorConfig(**FAST))
    with pytest.raises(TypeError, match="config must be an AttributorConfig"):
        Attributor(model, loss_fn, config={"k": 8})


def test_the_damping_setter_checks_and_normalizes():
    model, _, _ = make_problem()
    attr = Attributor(model, loss_fn, **FAST)
    attr.damping = "0.5*mean"
    assert attr.damping == "0.5*mean" == attr.config.damping
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        attr.damping = -1
    assert attr.damping == "0.5*mean"
