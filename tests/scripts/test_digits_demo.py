"""The README's main job end to end (without compilation, to keep the suite fast)."""
import json

import pytest
from script_loader import load_script

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_digits_demo_writes_a_sensible_attribution(tmp_path):
    load_script("digits_demo").main(["--out", str(tmp_path), "--no-compile", "--k", "64", "--queries", "3"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "attribution.png").stat().st_size > 10_000
    assert summary["test_accuracy"] > 0.9
    # helpful training digits share the test digit's label far more often than random pairs do
    assert summary["top5_helpful_same_label_rate"] > 3 * summary["random_pair_same_label_rate"]
    assert summary["top5_harmful_same_label_rate"] < summary["top5_helpful_same_label_rate"]
    assert len(summary["queries"]) == 3 and len(summary["queries"][0]["helpful"]) == 5
    # a second run retrains the same (seeded) model and reuses the whole store: every shard, the FIM and the
    # completion record stay byte for byte and untouched, and the attribution is the same
    store = tmp_path / "store"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file()}
    load_script("digits_demo").main(["--out", str(tmp_path), "--no-compile", "--k", "64", "--queries", "3"])
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*") if p.is_file()}
    assert after == before and any(p.name == "grads.npy" for p in before)
    assert json.loads((tmp_path / "summary.json").read_text())["queries"] == summary["queries"]
