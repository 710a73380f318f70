"""The on-disk store: layout, refusal of other configurations, incomplete and corrupt stores,
growth, read-only use and verification."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from attribution_problems import N_TEST, Interrupt, closed_form, interrupting, loss_fn, make_problem, snapshot, store_files

from attribution import Attributor, CorruptStoreError, IncompleteStoreError, StoreError, cli
from attribution import store as store_module

FAST = dict(compressor="factgrass", k=32, seed=3, compile=False, progress=False)
EXACT = dict(compressor="identity", k=10**6, dtype=torch.float64, compile=False, progress=False, damping=1e-2)


def test_layout_is_numpy_readable(tmp_path):
    model, train, _ = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["compressors"]["0"]["type"] == "FactGraSS" and manifest["seed"] == 3
    assert manifest["blocks"] == [["0", 32], ["2", 32]] and manifest["model_fingerprints"][0].startswith("sha256:")
    shard = np.load(tmp_path / "ckpt_000" / "shards" / "00000000" / "grads.npy", mmap_mode="r")
    assert shard.shape == (16, 64) and shard.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(np.array(shard)), attr.compress_batch(train[0])[0])
    complete = json.loads((tmp_path / "ckpt_000" / "complete.json").read_text())
    assert complete["samples"] == 48 and [s["index"] for s in complete["shards"]] == [0, 1, 2]
    eigvecs = np.load(tmp_path / "ckpt_000" / "fim" / "block_000.eigvecs.npy")
    assert eigvecs.dtype == np.float32 and eigvecs.shape == (32, 32)  # float32 unless the run is float64


def test_float64_runs_keep_a_float64_fim(tmp_path):
    model, train, _ = make_problem()
    Attributor(model, loss_fn, store=tmp_path, **EXACT).cache(train)
    assert np.load(tmp_path / "ckpt_000" / "fim" / "block_000.eigvecs.npy").dtype == np.float64


def test_other_configurations_and_models_are_refused(tmp_path):
    model, train, _ = make_problem(torch.float32)
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    with pytest.raises(ValueError, match="different configuration.*seed"):
        Attributor(model, loss_fn, store=tmp_path, **{**FAST, "seed": 1})
    with pytest.raises(ValueError, match="different configuration"):
        Attributor(model, loss_fn, store=tmp_path, **{**FAST, "compressor": "sjlt"})
    with torch.no_grad():
        model[0].weight[3, 4] += 1e-6  # one weight, barely changed
    with pytest.raises(ValueError, match="model_fingerprints"):
        Attributor(model, loss_fn, store=tmp_path, **FAST)


def test_a_store_without_its_manifest_is_not_recreated(tmp_path):
    model, train, _ = make_problem(torch.float32)
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(StoreError, match="no manifest.json: refusing to recreate"):
        Attributor(model, loss_fn, store=tmp_path, **{**FAST, "seed": 9})
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("method", ["if", "graddot", "gradcos", "tracin"])
def test_an_interrupted_store_is_refused_by_every_reader(tmp_path, method):
    model, train, test = make_problem(torch.float32)
    kwargs = {**FAST, "method": method}
    with pytest.raises(Interrupt):
        Attributor(model, loss_fn, store=tmp_path, **kwargs).cache(interrupting(train, after=2))
    fresh = Attributor(model, loss_fn, store=tmp_path, **kwargs)
    for call in (lambda: fresh.attribute(test), lambda: fresh.top_k(test, k=3), fresh.self_influence,
                 lambda: fresh.query_features(test), lambda: fresh.n_train):
        with pytest.raises(IncompleteStoreError, match=r"did not complete \(2 shards written.*cache\(\).*resume"):
            call()
    fresh.cache(train)
    assert fresh.attribute(test).shape == (N_TEST, 48)


def test_missing_and_extra_shards_are_named(tmp_path):
    model, train, test = make_problem(torch.float32)
    Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    shards = tmp_path / "ckpt_000" / "shards"
    shutil.copytree(shards / "00000001", shards / "00000003")  # a shard beyond the record: a grow in progress
    with pytest.raises(IncompleteStoreError, match=r"shards \[3\] lie beyond the completion record"):
        Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test)
    shutil.rmtree(shards / "00000003")
    shutil.rmtree(shards / "00000001")
    with pytest.raises(IncompleteStoreError, match=r"shards \[1\] of the completed cache are missing"):
        Attributor(model, loss_fn, store=tmp_path, **FAST).attribute(test)
    resumed = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)  # rewrites shard 1
    fresh = Attributor(model, loss_fn, store=tmp_path / "fresh", **FAST).cache(train)
    torch.testing.assert_close(resumed.attribute(test), fresh.attribute(test), rtol=0, atol=0)


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_a_grown_store_equals_a_fresh_cache_of_all_the_data(tmp_path, where):
    model, train, test = make_problem()
    store = None if where == "memory" else tmp_path / "grown"
    grown = Attributor(model, loss_fn, store=store, **EXACT)
    grown.cache(train[:2])
    before = grown.attribute(test)
    torch.testing.assert_close(before, closed_form(model, train[:2], test, 1e-2)[0], rtol=1e-9, atol=1e-9)
    grown.cache(train)  # one more batch: the FIM and the completion record must follow
    expected = closed_form(model, train, test, 1e-2)[0]
    torch.testing.assert_close(grown.attribute(test), expected, rtol=1e-9, atol=1e-9)
    if store is not None:  # and a fresh process-like reader sees the grown store
        torch.testing.assert_close(Attributor(model, loss_fn, store=store, **EXACT).attribute(test), expected,
                                   rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="beyond the train loader's 2 batches"):
        grown.cache(train[:2])


def test_a_reader_notices_that_another_attributor_grew_the_store(tmp_path):
    model, train, test = make_problem()
    reader = Attributor(model, loss_fn, store=tmp_path, **EXACT).cache(train[:1])
    reader.attribute(test)  # loads the one-batch FIM
    Attributor(model, loss_fn, store=tmp_path, **EXACT).cache(train)
    torch.testing.assert_close(reader.attribute(test), closed_form(model, train, test, 1e-2)[0], rtol=1e-9, atol=1e-9)


def _flip_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip", "flip_meta", "flip_fim"])
def test_corruption_is_detected_and_named(tmp_path, damage):
    model, train, test = make_problem(torch.float32)
    kwargs = {**FAST, "method": "trak", "output_fn": loss_fn} if damage == "flip_meta" else FAST
    Attributor(model, loss_fn, store=tmp_path, **kwargs).cache(train)
    shard = tmp_path / "ckpt_000" / "shards" / "00000001"
    target = {"truncate": shard / "grads.npy", "flip": shard / "grads.npy", "flip_meta": shard / "meta.json",
              "flip_fim": tmp_path / "ckpt_000" / "fim" / "block_001.eigvecs.npy"}[damage]
    if damage == "truncate":
        os.truncate(target, target.stat().st_size - 64)
        expected = "truncated or altered"
    elif damage == "flip_meta":
        target.write_text(target.read_text().replace('"values": [', '"values": [1e9, ', 1))  # an extra sample value
        expected = "truncated or altered|checksum mismatch"
    else:
        _flip_byte(target)
        expected = "checksum mismatch"
    fresh = Attributor(model, loss_fn, store=tmp_path, **kwargs)
    with pytest.raises(CorruptStoreError, match=f"{target.name}.*({expected})|({expected})") as err:
        fresh.attribute(test)
    assert str(target) in str(err.value)
    with pytest.raises(CorruptStoreError, match="verification failed") as err:
        fresh.verify()
    assert str(target) in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["verify", "--store", str(tmp_path)])
    assert exit_info.value.code == 1


def test_verify_passes_on_a_sound_store(tmp_path, capsys):
    model, train, _ = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    report = attr.verify()
    assert report["ok"] and report["shards"] == 3 and report["samples"] == 48
    assert cli.run(["verify", "--store", str(tmp_path)])["ok"]
    assert json.loads(capsys.readouterr().out)["problems"] == []


def _forbid_writes_under(monkeypatch, root):
    """Make every write below ``root`` fail, as on a read-only file system."""
    root = os.path.realpath(root)
    real_open, real_os_open = open, os.open

    def guarded(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.path.realpath(path).startswith(root) and set(mode) & set("wax+"):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if os.path.realpath(path).startswith(root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "link"):
        real = getattr(os, name)

        def refuse(*args, _real=real, **kwargs):
            if any(isinstance(a, (str, os.PathLike)) and os.path.realpath(a).startswith(root) for a in args):
                raise PermissionError(13, "Read-only file system", str(args[0]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, refuse)


def test_a_read_only_store_serves_attribution_and_an_up_to_date_cache_writes_nothing(tmp_path, monkeypatch):
    model, train, test = make_problem(torch.float32)
    expected = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train).attribute(test)
    before, files = snapshot(tmp_path), store_files(tmp_path)
    with monkeypatch.context() as patch:
        _forbid_writes_under(patch, tmp_path)
        attr = Attributor(model, loss_fn, store=tmp_path, **FAST)
        torch.testing.assert_close(attr.attribute(test), expected, rtol=0, atol=0)
        attr.top_k(test, k=3)
        attr.self_influence()
        attr.verify()
        attr.cache(train)  # complete, same configuration: nothing to write
    assert snapshot(tmp_path) == before and store_files(tmp_path) == files
    with monkeypatch.context() as patch:
        _forbid_writes_under(patch, tmp_path)
        with pytest.raises(StoreError, match="cannot write to store .*read-only"):
            Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train + train[:1])  # growth needs a write


def test_an_old_format_store_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "grass_ops.attribution.store/1"}))
    model, _, _ = make_problem(torch.float32)
    with pytest.raises(StoreError, match="format .*store/1.*new store path"):
        Attributor(model, loss_fn, store=tmp_path, **FAST)


def test_verify_finds_a_derived_file_missing_from_its_record(tmp_path):
    """A derived folder (the FIM) whose done.json lost a file's entry fails verify: an edited record is
    reported by its seal, one resealed by a forger still names the unrecorded file."""
    model, train, _ = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store=tmp_path, **FAST).cache(train)
    done = tmp_path / "ckpt_000" / "fim" / "done.json"
    record = json.loads(done.read_text())
    dropped = sorted(record["files"])[0]
    del record["files"][dropped]
    done.write_text(json.dumps(record))
    report = attr.store.verify()
    assert not report["ok"] and any("done.json: the record of derived data was altered" in p for p in report["problems"])
    done.write_text(json.dumps(store_module._sealed(record)))
    report = Attributor(model, loss_fn, store=tmp_path, **FAST).store.verify()
    assert not report["ok"] and any(dropped in p for p in report["problems"])
    assert attr.store.verify()["problems"] == report["problems"]


def test_an_output_path_inside_a_store_is_refused(tmp_path):
    model, train, test = make_problem(torch.float32)
    attr = Attributor(model, loss_fn, store=tmp_path / "store", **FAST).cache(train)
    Attributor(model, loss_fn, store=tmp_path / "other", **FAST).cache(train)
    before = {name: store_files(tmp_path / name) for name in ("store", "other")}
    shard = tmp_path / "store" / "ckpt_000" / "shards" / "00000000" / "grads.npy"
    for out in (shard, tmp_path / "store", tmp_path / "store" / "scores.npy", tmp_path / "other" / "ckpt_000" / "s.npy"):
        with pytest.raises(ValueError, match=re.escape(f"out={out} lies inside the store {tmp_path / out.relative_to(tmp_path).parts[0]}")):
            attr.attribute(test, out=out)
    assert {name: store_files(tmp_path / name) for name in ("store", "other")} == before and attr.verify()["ok"]
    torch.testing.assert_close(attr.attribute(test, out=tmp_path / "scores.npy"), attr.attribute(test))  # beside it: fine
