"""K-FAC / EK-FAC derived data in the store: statistics from the cache step (no extra pass), interrupted and
killed runs that resume, growth, fresh processes, many instances, odd batches and two ranks."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from attribution_problems import (
    Interrupt,
    dense_factors,
    grow_on_two_ranks_and_one,
    interrupting,
    kronecker_closed_form,
    loss_fn,
    make_problem,
    one_thread,  # noqa: F401 - autouse fixture: one torch thread for these tiny problems
    read_line,
    snapshot,
    store_files,
)

import attribution.kfac as kfac
from attribution import Attributor

HERE = os.path.dirname(__file__)
EXACT = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False, damping="0.1*mean")
FAST = dict(compressor="factgrass", k=16, seed=3, compile=False, progress=False, damping="0.1*mean")




class Counting:
    """A loss that counts the samples it differentiates (calls with grad enabled, not shape passes)."""

    def __init__(self):
        self.samples = 0

    def __call__(self, model, batch):
        if torch.is_grad_enabled():
            self.samples += len(batch[1])
        return loss_fn(model, batch)


def closed_form(model, train, test, kind="ekfac", damping="0.1*mean"):
    layers = [model[0], model[2]]
    return kronecker_closed_form(dense_factors(model, train, layers), dense_factors(model, test, layers), damping, kind)


def test_the_statistics_come_from_the_cache_step_and_are_recorded(tmp_path):
    model, train, test = make_problem()
    loss = Counting()
    attr = Attributor(model, loss, preconditioner="kfac", store=tmp_path, **EXACT).cache(train)
    assert loss.samples == 48  # one pass: the K-FAC sums need no extra one
    ekfac = Counting()
    Attributor(model, ekfac, preconditioner="ekfac", store=tmp_path / "ek", **EXACT).cache(train)
    assert ekfac.samples == 2 * 48  # EK-FAC: one more pass, for the correction
    done = json.loads((tmp_path / "ckpt_000" / "kfac" / "done.json").read_text())
    assert done["meta"]["damping"] == "0.1*mean" and done["meta"]["preconditioner"] == "kfac"
    assert done["meta"]["counts"] == {"samples": 48, "0.tokens": 48, "2.tokens": 48} and len(done["meta"]["covered"]) == 3
    assert sorted(os.listdir(tmp_path / "ckpt_000")) == ["complete.json", "kfac", "shards"]  # no partial sums left, no FIM
    assert attr.verify()["ok"]
    torch.testing.assert_close(attr.attribute(test), closed_form(model, train, test, "kfac"), rtol=1e-9, atol=1e-9)
    before = snapshot(tmp_path)
    Attributor(model, loss_fn, preconditioner="kfac", store=tmp_path, **EXACT).cache(train)  # up to date: no write
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("save_seconds", [0.0, 1e9])
def test_an_interrupted_cache_resumes(tmp_path, monkeypatch, save_seconds):
    """Saved partial sums (save_seconds=0) are reused; unsaved ones are recomputed for the missing shards only."""
    monkeypatch.setattr(kfac, "SAVE_SECONDS", save_seconds)
    model, train, test = make_problem()
    with pytest.raises(Interrupt):
        Attributor(model, loss_fn, preconditioner="ekfac", store=tmp_path, **EXACT).cache(interrupting(train, after=2))
    partial = tmp_path / "ckpt_000" / "kfac_partial.rank0" / "done.json"
    if save_seconds == 0:
        assert sorted(json.loads(partial.read_text())["meta"]["covered"]) == ["0", "1"]
    else:
        assert not partial.exists()
    loss = Counting()
    resumed = Attributor(model, loss, preconditioner="ekfac", store=tmp_path, **EXACT).cache(train)
    # the last shard, the K-FAC statistics of the first two only if they were not saved, and the EK-FAC pass
    assert loss.samples == 16 + (0 if save_seconds == 0 else 32) + 48
    assert [n for n in os.listdir(tmp_path / "ckpt_000") if "partial" in n] == []
    torch.testing.assert_close(resumed.attribute(test), closed_form(model, train, test), rtol=1e-9, atol=1e-9)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {here!r})
    from attribution_problems import loss_fn, make_problem
    import attribution.kfac as kfac
    from attribution import Attributor
    kfac.SAVE_SECONDS = 0.0
    model, train, test = make_problem()

    class Slow:  # the second pass over the data (the EK-FAC correction) stalls after its first batch
        passes = 0
        def __iter__(self):
            Slow.passes += 1
            for b in train:
                yield b
                if Slow.passes == 2:
                    print("correction batch", flush=True)
                    time.sleep({delay})
    Attributor(model, loss_fn, preconditioner="ekfac", store={store!r}, compressor="identity", k=10**6,
               dtype=torch.float64, compile=False, progress=False, damping="0.1*mean").cache(Slow())
    print("done", flush=True)
    """
)


def test_sigkill_during_the_ekfac_pass_resumes_in_a_fresh_process(tmp_path):
    store = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(here=HERE, delay=60, store=store)],
                            stdout=subprocess.PIPE, text=True)
    assert read_line(proc) == "correction batch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = os.path.join(store, "ckpt_000")
    assert not os.path.exists(os.path.join(ckpt, "complete.json"))  # derived data comes before the record
    partial = json.loads(open(os.path.join(ckpt, "ekfac_partial", "done.json")).read())
    assert list(partial["meta"]["covered"]) == ["0"]
    model, train, test = make_problem()
    loss = Counting()
    resumed = Attributor(model, loss, preconditioner="ekfac", store=store, **EXACT).cache(train)
    assert loss.samples == 32  # the correction's two remaining batches, nothing else
    torch.testing.assert_close(resumed.attribute(test), closed_form(model, train, test), rtol=1e-9, atol=1e-9)
    # and another process reads the finished store
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from attribution_problems import loss_fn, make_problem
        from attribution import Attributor
        torch.set_num_threads(1)  # this process's GEMM blocking: the same bits
        model, train, test = make_problem()
        attr = Attributor(model, loss_fn, preconditioner="ekfac", store={store!r}, compressor="identity", k=10**6,
                          dtype=torch.float64, compile=False, progress=False, damping="0.1*mean")
        torch.save(attr.attribute(test), {str(tmp_path / "other.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "other.pt"), resumed.attribute(test), rtol=0, atol=0)


@pytest.mark.parametrize("on_disk", [True, False])
def test_a_grown_store_recomputes_kfac_and_the_correction(tmp_path, on_disk):
    model, train, test = make_problem()
    store = tmp_path if on_disk else None
    loss = Counting()
    attr = Attributor(model, loss, preconditioner="ekfac", store=store, **EXACT)
    before = attr.cache(train[:2]).attribute(test)
    torch.testing.assert_close(before, closed_form(model, train[:2], test), rtol=1e-9, atol=1e-9)
    loss.samples = 0
    attr.cache(train)
    assert loss.samples == 16 + 48  # the new shard (its K-FAC sums join the stored ones) + the new correction pass
    grown = attr.attribute(test)
    torch.testing.assert_close(grown, closed_form(model, train, test), rtol=1e-9, atol=1e-9)
    if on_disk:  # a reader that loaded the old factors notices the growth
        again = Attributor(model, loss_fn, preconditioner="ekfac", store=store, **EXACT)
        torch.testing.assert_close(again.attribute(test), grown, rtol=0, atol=0)


def test_a_fim_store_serves_kfac_without_a_new_cache(tmp_path):
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    shards = {k: v for k, v in store_files(tmp_path).items() if "shards" in k or k.endswith("complete.json")}
    kf = Attributor(model, loss_fn, preconditioner="kfac", store=tmp_path, **FAST)
    with pytest.raises(RuntimeError, match="no K-FAC factors .* call cache"):
        kf.attribute(test)  # a reader never writes: it says how to get them
    loss = Counting()
    attr = Attributor(model, loss, preconditioner="kfac", store=tmp_path, **FAST).cache(train)
    assert loss.samples == 48  # one pass over the factors, no compression stored
    scores = attr.attribute(test)
    assert {k: v for k, v in store_files(tmp_path).items() if k in shards} == shards
    fresh = Attributor(model, loss_fn, preconditioner="kfac", store=tmp_path / "fresh", **FAST).cache(train)
    # the FIM store's shards came from the in-backward sketch, the fresh store's from the factor path:
    # the same compressed gradients up to float32 rounding, relative to the scores' scale
    torch.testing.assert_close(scores, fresh.attribute(test), rtol=1e-5, atol=1e-5 * float(scores.abs().max()))
    # and the FIM is still there for preconditioner="fim"
    torch.testing.assert_close(Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test),
                               Attributor(model, loss_fn, store=tmp_path / "fresh", **FAST).cache(train).attribute(test))


def test_many_instances_in_one_process():
    model, train, test = make_problem(torch.float32)
    configs = [dict(preconditioner=p, compressor=c, k=16, seed=s) for p, c, s in
               (("kfac", "factgrass", 0), ("kfac", "factgrass", 1), ("kfac", "sjlt", 0), ("ekfac", "factgrass", 0),
                ("ekfac", "logra", 0), ("ekfac", "sjlt", 1))]
    common = dict(compile=False, progress=False, damping="0.1*mean")
    attrs = [Attributor(model, loss_fn, **cfg, **common) for cfg in configs]
    for attr in attrs:  # interleaved: every instance cached before any attributes
        attr.cache(train)
    together = [attr.attribute(test) for attr in attrs]
    for cfg, scores in zip(configs, together):
        alone = Attributor(model, loss_fn, **cfg, **common).cache(train).attribute(test)
        torch.testing.assert_close(scores, alone, rtol=0, atol=0)
    assert len({round(float(s.sum()), 3) for s in together}) == len(configs)


def test_smallest_and_odd_batches_compiled(kind="ekfac"):
    model, _, test = make_problem(n_train=24)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 10, dtype=torch.float64, generator=gen), torch.randint(0, 4, (23,), generator=gen)
    odd = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 23, 7)]  # 7, 7, 7, 2: the short one is padded
    single = [(x[:1], y[:1])]
    for train in (odd, single):
        attr = Attributor(model, loss_fn, preconditioner=kind, **{**EXACT, "compile": True})
        scores = attr.cache(train).attribute(test)
        torch.testing.assert_close(scores, closed_form(model, train, test, kind), rtol=1e-9, atol=1e-9)
        assert attr.stats["compiled"] and attr.stats["fallback"] is None


FAST32 = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False, damping="0.1*mean", preconditioner="ekfac")


def test_two_ranks_give_the_scores_of_one_process(tmp_path):
    ranks, (expected_part, expected) = grow_on_two_ranks_and_one(tmp_path, FAST32)
    store = str(tmp_path / "dist")
    files = store_files(store)
    assert {k: v for k, v in files.items() if "shards" in k} == {k: v for k, v in store_files(tmp_path / "single").items()
                                                                  if "shards" in k}
    assert not [k for k in files if "partial" in k]
    counts = json.loads(files["ckpt_000/kfac/done.json"])["meta"]["counts"]
    assert counts["samples"] == 45
    for scores, grown in ranks:
        torch.testing.assert_close(scores, expected_part, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grown, expected, rtol=1e-4, atol=1e-4)
