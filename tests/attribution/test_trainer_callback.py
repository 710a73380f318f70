"""attribution.integrations.GradientCacheCallback (issue 20, item 3): the compressed per-sample gradients of the
Trainer's batches at chosen steps, each row equal to its example's gradient at the weights of its step; a store an
Attributor reads in a fresh process; TracIn query scores on the fly; a killed run resumed; a store that grows;
two callbacks in one Trainer; 2 gloo ranks; clear errors for bad inputs."""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the `llm` extra is not installed")

from trainer_runs import (  # noqa: E402
    OPTIONS,
    QUERIES,
    Snapshots,
    collate,
    examples,
    reference_rows,
    run_script,
    tiny_model,
    train,
)
from transformers import TrainerCallback  # noqa: E402

from attribution import Attributor  # noqa: E402
from attribution.integrations import GradientCacheCallback, causal_lm_loss, example_digest, recorded_rows  # noqa: E402
from attribution.store import DiskStore  # noqa: E402


def _stored(store) -> torch.Tensor:
    """[n_rows, columns]: the completed store's rows in order."""
    opened = DiskStore(store)
    return torch.cat([opened.read_shard(0, s).float() for s in opened.require_complete(0).shards])


def _query_gradients(weights: dict) -> torch.Tensor:
    model = tiny_model()
    model.load_state_dict(weights)
    attr = Attributor(model, causal_lm_loss, compile=False, progress=False, **OPTIONS)
    return torch.cat([attr.compress_batch(q)[0] for q in QUERIES])


# batch 1; and batches of 3 accumulated over 2 micro-batches: an epoch of 7 examples is a step of 3 + 3 and a step of 1.
# fused=None: the rows come from the training step's own backward; fused=False: recomputed in eval mode
@pytest.mark.parametrize("batch,accumulation,every,per_step,fused", [(1, 1, 1, {1: 1, 2: 1, 3: 1, 4: 1}, None),
                                                                     (3, 2, 1, {1: 6, 2: 1, 3: 6, 4: 1}, None),
                                                                     (3, 2, 2, {2: 1, 4: 1}, False)])
def test_rows_are_the_examples_gradients_at_the_weights_of_their_step(tmp_path, batch, accumulation, every, per_step,
                                                                      fused):
    callback = GradientCacheCallback(tmp_path / "store", queries=QUERIES, every=every, fused=fused, **OPTIONS)
    snapshots = Snapshots(callback.records)
    train(str(tmp_path / "out"), [callback, snapshots], max_steps=4, batch=batch, accumulation=accumulation)
    rows = recorded_rows(tmp_path / "store")
    steps = sorted(snapshots.weights)
    assert callback.mode == ("fused" if fused is None else "recompute")
    assert steps == [s for s in range(1, 5) if s % every == 0]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows) and {r["step"] for r in rows} == set(steps)
    assert {s: sum(r["step"] == s for r in rows) for s in steps} == per_step
    stored = _stored(tmp_path / "store")
    want = reference_rows(snapshots.weights, rows)
    torch.testing.assert_close(stored, want, rtol=1e-4, atol=1e-5)
    # on the fly: lr_t * g_q(w_t) . g_z(w_t) per row, and per example summed over its steps (TracIn)
    scores, score_rows = callback.query_scores()
    assert score_rows == rows
    queries = {s: _query_gradients(snapshots.weights[s]) for s in steps}
    expected = torch.stack([snapshots.lrs[r["step"]] * queries[r["step"]] @ want[i] for i, r in enumerate(rows)], dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    tracin, digests = callback.example_scores()
    assert len(digests) == len(set(r["digest"] for r in rows))
    for j, digest in enumerate(digests):
        columns = [i for i, r in enumerate(rows) if r["digest"] == digest]
        torch.testing.assert_close(tracin[:, j], expected[:, columns].sum(1), rtol=1e-4, atol=1e-6)


def test_fused_recording_falls_back_to_recomputing_when_the_training_step_differs(tmp_path):
    """Dropout in the training step: the first fused row differs from the eval-mode gradient; fused=None warns and
    recomputes (every row is still the eval-mode gradient), fused=True refuses; a custom loss_fn is recomputed."""
    callback = GradientCacheCallback(tmp_path / "store", every=1, **OPTIONS)
    snapshots = Snapshots(callback.records)
    with pytest.warns(RuntimeWarning, match="recomputing the per-sample gradients from now on .*dropout"):
        train(str(tmp_path / "out"), [callback, snapshots], max_steps=2, model=tiny_model(dropout=0.5))
    assert callback.mode == "recompute"
    rows = recorded_rows(tmp_path / "store")
    weights = snapshots.weights
    torch.testing.assert_close(_stored(tmp_path / "store"), reference_rows(weights, rows), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="fused=True: .*dropout"):
        train(str(tmp_path / "o2"), [GradientCacheCallback(tmp_path / "s2", fused=True, **OPTIONS)], max_steps=1,
              model=tiny_model(dropout=0.5))
    custom = GradientCacheCallback(tmp_path / "s3", loss_fn=lambda model, batch: causal_lm_loss(model, batch), **OPTIONS)
    train(str(tmp_path / "o3"), [custom], max_steps=1)
    assert custom.mode == "recompute"
    with pytest.raises(ValueError, match="give no loss_fn"):
        GradientCacheCallback(tmp_path / "s4", fused=True, loss_fn=causal_lm_loss)


def test_a_fresh_process_writes_the_store_and_an_attributor_reads_it_with_the_trained_model(tmp_path):
    run_script("--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.pt"))
    report = torch.load(tmp_path / "r.pt")
    final = train(str(tmp_path / "again"), [], max_steps=4)  # the same run without the callback: the same weights
    attr = Attributor(final, causal_lm_loss, method="graddot", store=tmp_path / "store", compile=False, progress=False,
                      **OPTIONS)
    assert attr.n_train == len(report["rows"]) == len(recorded_rows(tmp_path / "store"))
    queries = torch.cat([attr.compress_batch(q)[0] for q in QUERIES])
    torch.testing.assert_close(attr.attribute(QUERIES), queries @ _stored(tmp_path / "store").T, rtol=1e-5, atol=1e-6)
    # the influence function reads the FIM the callback derived when training ended
    influence = Attributor(final, causal_lm_loss, store=tmp_path / "store", compile=False, progress=False, **OPTIONS)
    assert torch.isfinite(influence.attribute(QUERIES)).all()
    with pytest.raises(ValueError, match="recorded during training"):
        attr.cache([collate(examples(2))])


def test_a_killed_run_resumed_from_its_checkpoint_gives_the_uninterrupted_store(tmp_path):
    run_script("--store", str(tmp_path / "whole"), "--out", str(tmp_path / "o1"), "--save-steps", "2")
    killed = run_script("--store", str(tmp_path / "store"), "--out", str(tmp_path / "o2"), "--save-steps", "2",
                        "--stop-at", "4", check=False)
    assert killed.returncode == 3
    store = DiskStore(tmp_path / "store")
    assert store.completion(0) is None and sorted({int(m["step"]) for m in store.shard_meta(0).values()}) == [1, 2, 3]
    run_script("--store", str(tmp_path / "store"), "--out", str(tmp_path / "o2"), "--save-steps", "2",
               "--resume", str(tmp_path / "o2" / "checkpoint-2"), "--report", str(tmp_path / "r.pt"))
    assert recorded_rows(tmp_path / "store") == recorded_rows(tmp_path / "whole")
    torch.testing.assert_close(_stored(tmp_path / "store"), _stored(tmp_path / "whole"), rtol=1e-5, atol=1e-6)
    # the resumed run's own scores cover the steps it ran (3 and 4; step 3's rows were read back from the store)
    assert {r["step"] for r in torch.load(tmp_path / "r.pt")["rows"]} == {3, 4}


def test_a_train_that_raised_in_this_process_is_resumed_by_the_same_callback(tmp_path):
    """The exception leaves the hooks and the writer lock behind; the next train() of the callback releases them."""

    class Raise(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == 4:
                raise KeyboardInterrupt

    whole = GradientCacheCallback(tmp_path / "whole", **OPTIONS)
    train(str(tmp_path / "o1"), [whole], max_steps=4)
    callback = GradientCacheCallback(tmp_path / "store", **OPTIONS)
    with pytest.raises(KeyboardInterrupt):
        train(str(tmp_path / "o2"), [callback, Raise()], max_steps=4, save_steps=2)
    model = tiny_model()
    train(str(tmp_path / "o2"), [callback], max_steps=4, save_steps=2, model=model,
          resume=str(tmp_path / "o2" / "checkpoint-2"))
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert recorded_rows(tmp_path / "store") == recorded_rows(tmp_path / "whole")
    torch.testing.assert_close(_stored(tmp_path / "store"), _stored(tmp_path / "whole"), rtol=1e-5, atol=1e-6)


def test_a_training_forward_that_raises_takes_the_taps_off_and_leaves_the_store_unlocked(tmp_path):
    """Step 2's forward raises inside the model (after the callback put its taps on): the taps come off, the hooks
    go inert, and a new callback and Trainer on the same model and store record again."""
    model = tiny_model()
    failing = {"step": 0}

    def boom(module, args):
        if failing["step"]:
            raise RuntimeError("out of memory (simulated)")

    class Arm(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            failing["step"] = state.global_step + 1 == 2

    handle = model.model.layers[1].register_forward_pre_hook(boom)
    first = GradientCacheCallback(tmp_path / "store", **OPTIONS)
    with pytest.raises(RuntimeError, match="simulated"):
        train(str(tmp_path / "o1"), [first, Arm()], max_steps=3, model=model)
    handle.remove()
    assert not first.attributor.gradients.compress.capture.armed
    assert not any(m._forward_hooks for m in model.model.layers.modules())  # the capture's layer hooks are gone
    again = GradientCacheCallback(tmp_path / "store", **OPTIONS)  # the store is not locked
    train(str(tmp_path / "o2"), [again], max_steps=1, model=tiny_model())  # step 1 again: shard 0 read back
    assert [r["step"] for r in recorded_rows(tmp_path / "store")] == [1, 1, 1]


def test_training_on_grows_the_store_and_its_fim(tmp_path):
    first = GradientCacheCallback(tmp_path / "store", every=1, **OPTIONS)
    train(str(tmp_path / "out"), [first], max_steps=2, save_steps=2)
    before = len(recorded_rows(tmp_path / "store"))
    fim_before = DiskStore(tmp_path / "store").require_complete(0).fingerprint
    more = GradientCacheCallback(tmp_path / "store", every=1, **OPTIONS)
    train(str(tmp_path / "out"), [more], max_steps=4, resume=str(tmp_path / "out" / "checkpoint-2"))
    rows = recorded_rows(tmp_path / "store")
    assert len(rows) == before + 6 - 5 + 3 and {r["step"] for r in rows} == {1, 2, 3, 4}  # steps 3, 4: 3 + 1 examples
    record = DiskStore(tmp_path / "store").require_complete(0)
    assert record.fingerprint != fim_before and DiskStore(tmp_path / "store").has_derived(0, "fim", record.fingerprint)


def test_two_callbacks_in_one_trainer_record_independently(tmp_path):
    a = GradientCacheCallback(tmp_path / "a", every=1, **OPTIONS)
    b = GradientCacheCallback(tmp_path / "b", queries=QUERIES, steps=[2, 3], compressor="sjlt", k=8, seed=1)
    snapshots = Snapshots(a.records)
    train(str(tmp_path / "out"), [a, b, snapshots], max_steps=3)
    rows_a, rows_b = recorded_rows(tmp_path / "a"), recorded_rows(tmp_path / "b")
    assert {r["step"] for r in rows_a} == {1, 2, 3} and rows_b == [r for r in rows_a if r["step"] in (2, 3)]
    torch.testing.assert_close(_stored(tmp_path / "a"), reference_rows(snapshots.weights, rows_a), rtol=1e-4, atol=1e-5)
    assert _stored(tmp_path / "b").shape[0] == len(rows_b) and b.query_scores()[0].shape == (3, len(rows_b))


def test_two_gloo_ranks_record_every_example_at_its_steps_weights(tmp_path):
    run_script("--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--report", str(tmp_path / "r.pt"),
               "--ranks", "--max-steps", "2", ranks=2)
    report = torch.load(tmp_path / "r.pt")
    rows = recorded_rows(tmp_path / "store")
    assert report["rows"] == rows and len(rows) == 2 * 2 * 3  # 2 steps x 2 ranks x 3 examples
    want = reference_rows(report["weights"], rows)
    torch.testing.assert_close(_stored(tmp_path / "store"), want, rtol=1e-4, atol=1e-5)
    # a callback with queries and no store, beside it, scores the same rows alike
    torch.testing.assert_close(report["scores_only"][0], report["scores"], rtol=1e-5, atol=1e-6)
    assert report["scores_only"][1] == rows


def test_example_digest_ignores_padding_and_tells_examples_apart():
    batch = collate(examples(3))
    digests = [example_digest(batch["input_ids"][i], batch["attention_mask"][i]) for i in range(3)]
    assert digests == [example_digest(torch.tensor(e["input_ids"])) for e in examples(3)] and len(set(digests)) == 3
    with pytest.raises(ValueError, match="attention_mask has 2 entries"):
        example_digest(torch.tensor([1, 2, 3]), torch.tensor([1, 1]))


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing to record"):
        GradientCacheCallback()
    with pytest.raises(ValueError, match="every= or steps="):
        GradientCacheCallback(tmp_path / "s", every=2, steps=[1])
    with pytest.raises(ValueError, match="every"):
        GradientCacheCallback(tmp_path / "s", every=0)
    with pytest.raises(ValueError, match="steps is empty"):
        GradientCacheCallback(tmp_path / "s", steps=[])
    with pytest.raises(TypeError, match="unexpected options \\['method'\\]"):
        GradientCacheCallback(tmp_path / "s", method="trak")
    with pytest.raises(TypeError, match="queries must be batches"):
        GradientCacheCallback(queries=[torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="queries"):
        GradientCacheCallback(tmp_path / "s").query_scores()
    # a store recorded during training with another model
    train(str(tmp_path / "out"), [GradientCacheCallback(tmp_path / "store", **OPTIONS)], max_steps=1)
    with pytest.raises(ValueError, match="different configuration"):
        train(str(tmp_path / "out2"), [GradientCacheCallback(tmp_path / "store", **OPTIONS)], max_steps=1,
              model=tiny_model(hidden=48))
    # the same store read with another compressor, and a store of fixed weights is not one recorded in training
    with pytest.raises(ValueError, match="different configuration"):
        Attributor(tiny_model(), causal_lm_loss, store=tmp_path / "store", compile=False, progress=False, k=8)
    Attributor(tiny_model(), causal_lm_loss, store=tmp_path / "fixed", compile=False, progress=False,
               **OPTIONS).cache([collate(examples(2))])
    with pytest.raises(ValueError, match="not recorded during training"):
        recorded_rows(tmp_path / "fixed")


def test_grass_attribute_reads_a_store_the_callback_wrote_with_cli_model(tmp_path, tiny_llama):
    """cli_model=: the store gets cli.json and docs.jsonl; `grass-attribute verify` and `attribute` in a fresh process
    read it with the saved trained model, and `attribute`'s top documents are the callback store's rows by score."""
    from cli_runs import fresh_process
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from attribution.llm import query_batches, sequence_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    docs = ["the data privacy statement", "a for loop list", "lambda expression creates function", "assert statement",
            "python list data"]
    saved = tmp_path / "trained"
    callback = GradientCacheCallback(tmp_path / "store", cli_model=str(saved), **OPTIONS)
    args = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=5e-2, report_to=[], use_cpu=True,
                remove_unused_columns=False, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), processing_class=tokenizer,
                      args=TrainingArguments(output_dir=str(tmp_path / "out"), **args), callbacks=[callback],
                      train_dataset=[{"input_ids": tokenizer(t)["input_ids"]} for t in docs], data_collator=collate)
    trainer.train()
    trainer.save_model(str(saved))
    rows = recorded_rows(tmp_path / "store")
    verified = fresh_process("verify", "--store", str(tmp_path / "store"))
    assert verified.returncode == 0, verified.stderr[-2000:]
    query = {"prompt": "a for", "completion": " loop list"}
    (tmp_path / "q.jsonl").write_text(json.dumps(query) + "\n")
    done = fresh_process("attribute", "--store", str(tmp_path / "store"), "--prompts", str(tmp_path / "q.jsonl"),
                         "--top-k", "2", "--method", "graddot", "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr[-2000:]
    top = json.loads(done.stdout.strip().splitlines()[-1])["queries"][0]["top"]
    attr = Attributor(trainer.model, sequence_loss, method="graddot", store=tmp_path / "store", compile=False,
                      progress=False, **OPTIONS)
    scores = attr.attribute(query_batches(tokenizer, [query], 1, 128))[0]
    order = torch.argsort(-scores, stable=True)[:2].tolist()
    assert top == [f"{rows[i]['step']}:{rows[i]['digest']}" for i in order]
    with pytest.raises(ValueError, match="cli_model .* needs store="):
        GradientCacheCallback(queries=QUERIES, cli_model=str(saved))
