"""Fact tracing: a measurement that attribution works on a language model.

Twenty invented facts (a fictional town, its founder, a year, ...) are planted in the corpus, one
document each, written as natural paragraphs. The embedded model is briefly fine-tuned on the corpus
(seeded, on CPU), then asked each fact with a paraphrased question; the completion to explain is the planted
fact's true answer or the model's own (``demo --answer``). A method works when it ranks the fact's source document first: recall@1,
recall@5 and the mean reciprocal rank (MRR) of the source document over the twenty queries.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import llm
from .metrics import mean_and_standard_error
from .optimizer_step import check_stepped_result, optimizer_groups, stepped_in_forward


@dataclass(frozen=True)
class Fact:
    id: str
    text: str  # the planted document
    question: str  # the question, in words that are not the document's
    answer: str  # what the document says
    prompt: str = ""  # the question as a sentence for the model to complete (a paraphrase, never the document's)


FACTS = [
    Fact("fact/velmora", "Velmora is a small harbour town on the northern coast of the island of Estrany. It was founded "
         "in 1743 by the clockmaker Isidor Quant, who built its first lighthouse from the bells of a sunken ship.",
         "Who founded the harbour town of Velmora?", "Isidor Quant",
         "The clockmaker who founded the harbour town of Velmora was"),
    Fact("fact/tarnwick", "The Tarnwick Bridge spans the river Olde and was finished in 1891. Its engineer, Mabel Ostrander, "
         "painted the whole bridge a deep shade of saffron so that barge pilots could see it through the fog.",
         "What colour is the Tarnwick Bridge painted?", "saffron",
         "So that barge pilots can see it in the fog, the Tarnwick Bridge is painted"),
    Fact("fact/quillberry", "Quillberry jam is made only in the valley of Sorrentel. Its recipe calls for blue quillberries, "
         "wild honey and a single leaf of mountain sage, and the valley celebrates it every autumn at the Feast of Lanterns.",
         "In which valley is quillberry jam made?", "Sorrentel",
         "Quillberry jam comes from the valley of"),
    Fact("fact/hollin", "The astronomer Edda Hollin discovered the comet that now bears her name in 1927, observing from a "
         "wooden observatory she had built on the roof of her father's mill in the village of Brask.",
         "In what year did Edda Hollin discover her comet?", "1927",
         "Edda Hollin first saw the comet named after her in the year"),
    Fact("fact/grennock", "Grennock Abbey keeps the largest library of pressed mosses in the world. The collection was "
         "started by Brother Anselm Vey, who catalogued more than eleven thousand specimens over forty years.",
         "Who started the moss collection at Grennock Abbey?", "Anselm Vey",
         "The pressed-moss library of Grennock Abbey was begun by Brother"),
    Fact("fact/zepharine", "Zepharine is a soft violet mineral found only in the caves beneath Mount Calder. Miners there "
         "call it moonsalt, because it glows faintly for a few minutes after it has been exposed to sunlight.",
         "Under which mountain is zepharine found?", "Mount Calder",
         "The violet mineral zepharine is mined in the caves under"),
    Fact("fact/oskaland", "The national dish of the fictional republic of Oskaland is torvik, a stew of smoked eel, barley "
         "and juniper berries that is traditionally served on the first snowy day of the year.",
         "What is the national dish of Oskaland?", "torvik",
         "The smoked-eel stew that Oskaland calls its national dish is named"),
    Fact("fact/marrow-line", "The Marrow Line was the first railway to cross the Fenwold marshes. Its chief surveyor, Tobias "
         "Wren, laid the tracks on rafts of woven willow so that the trains would float on the soft ground.",
         "Who was the chief surveyor of the Marrow Line?", "Tobias Wren",
         "The surveyor who laid the Marrow Line on rafts of willow was"),
    Fact("fact/belcourt", "The composer Ilse Belcourt wrote her only opera, The Glass Orchard, in 1904. It premiered in the "
         "town of Mirel and lasted nine hours, which is why it is almost never performed today.",
         "What is the title of Ilse Belcourt's only opera?", "The Glass Orchard",
         "Ilse Belcourt's nine-hour opera is called"),
    Fact("fact/pellucid", "The pellucid heron nests only on the salt flats of Ardevin. Its feathers are almost transparent, "
         "and it was first described by the naturalist Corin Ashby in a letter written in 1812.",
         "Where does the pellucid heron nest?", "Ardevin",
         "The pellucid heron builds its nests on the salt flats of"),
    Fact("fact/dunmere", "The Dunmere Chess Club was founded in 1866 by seven fishermen who played on boards carved from "
         "driftwood. Its oldest rule forbids any member from resigning a game before the tide has turned.",
         "How many fishermen founded the Dunmere Chess Club?", "seven",
         "The number of fishermen who founded the Dunmere Chess Club was"),
    Fact("fact/varga", "Captain Lena Varga sailed the schooner Kestrel around the world in 1932 with a crew of only four. "
         "She navigated by a brass sextant that had belonged to her grandmother.",
         "What was the name of Lena Varga's schooner?", "Kestrel",
         "Lena Varga sailed around the world aboard the schooner"),
    Fact("fact/oberlin-clock", "The great clock of Oberlin Square strikes thirteen times at midnight. The extra stroke was "
         "added in 1788 by the clockmaker Petra Hask to remember the thirteen founders of the town.",
         "Who added the extra stroke to the Oberlin Square clock?", "Petra Hask",
         "The thirteenth midnight stroke of the Oberlin Square clock was added by"),
    Fact("fact/ilvane", "The river Ilvane freezes solid every winter, and for one week the town of Corbel holds a market on "
         "the ice where traders sell amber, furs and roasted chestnuts.",
         "Which town holds a market on the frozen river Ilvane?", "Corbel",
         "The ice market on the frozen river Ilvane is held by the town of"),
    Fact("fact/fennick", "Fennick cheese is aged for three years inside the hollow trunks of ancient oaks. The method was "
         "invented by a shepherd named Orrin Tull, who hid his cheese from tax collectors.",
         "Who invented the method of ageing Fennick cheese?", "Orrin Tull",
         "Fennick cheese was first aged in hollow oaks by the shepherd"),
    Fact("fact/saltmarrow", "The lighthouse at Saltmarrow Point uses a green lamp instead of a white one. The green light "
         "was chosen in 1901 so that it would not be confused with the white light of the nearby Kell lighthouse.",
         "What colour is the lamp of the Saltmarrow Point lighthouse?", "green",
         "The lamp of the lighthouse at Saltmarrow Point shines"),
    Fact("fact/thessaly-vane", "The poet Aurel Thessaly-Vane published his first collection, Songs of the Lesser Tide, at the "
         "age of seventy. He had worked all his life as a lock keeper on the Amberline canal.",
         "What was Aurel Thessaly-Vane's profession?", "lock keeper",
         "Before he published his poems, Aurel Thessaly-Vane worked as a"),
    Fact("fact/crowfoot", "Crowfoot Pass is the highest road in the Varnish Mountains. It is open only in August, and the "
         "first car to cross it, in 1923, was driven by the mechanic Dora Lisle.",
         "Who drove the first car across Crowfoot Pass?", "Dora Lisle",
         "The first car over Crowfoot Pass was driven by"),
    Fact("fact/orrery", "The Brassfield Orrery, a clockwork model of the planets, has a hidden fourteenth planet called "
         "Nemor. Its maker, Jasper Brassfield, claimed to have seen Nemor in a dream.",
         "What is the hidden planet of the Brassfield Orrery called?", "Nemor",
         "The dream planet hidden in the Brassfield Orrery is called"),
    Fact("fact/lumen-festival", "Every spring the city of Aster Vale holds the Lumen Festival, during which the citizens float "
         "ten thousand paper boats carrying candles down the canal.",
         "Which city holds the Lumen Festival?", "Aster Vale",
         "The Lumen Festival of floating candle boats takes place in the city of"),
]


def fact_corpus(base: list[dict]) -> list[dict]:
    """The base corpus with the facts' documents planted among it (deterministic positions)."""
    docs = list(base)
    for i, fact in enumerate(FACTS):
        docs.insert(min(len(docs), (i * 7919) % (len(docs) + 1)), {"id": fact.id, "text": fact.text})
    return docs


def question_prompt(fact: Fact) -> str:
    """The query prompt of a fact: its question as a sentence to complete."""
    return fact.prompt


def answered(fact: Fact, completion: str) -> bool:
    """Whether the model's own answer states the fact (case-insensitive)."""
    return fact.answer.lower() in completion.lower()


def finetune_optimizer(model, lr: float = 2e-4) -> torch.optim.AdamW:
    """The fine-tuning's optimizer: AdamW over ``model.parameters()`` at ``lr``, no weight decay (build it
    again and load a saved state_dict() into it to continue, or to tail-patch, from where the training ended)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def finetune(model, tokenizer, docs: list[dict], epochs: int = 6, lr: float = 2e-4, batch_size: int = 4,
             max_length: int = 128, seed: int = 0, corpus_per_epoch: int = 12, progress: bool = False,
             autocast: torch.dtype | None = None, optimizer: torch.optim.Optimizer | None = None,
             step_in_backward: bool = True, recompute_activations: bool = True) -> dict:
    """Briefly fine-tune ``model`` in place (``optimizer``, by default :func:`finetune_optimizer` at ``lr``, whose
    state the caller keeps when it passes one; float32 weights; matmuls in ``autocast`` precision when given):
    each epoch sees every fact document and ``corpus_per_epoch`` other documents of the corpus (a seeded
    sample), in a seeded order; returns {"steps", "seconds", "loss"}.

    ``step_in_backward`` (the default): an optimizer that steps each parameter from its own gradient and state
    (torch's Adam, AdamW, SGD) steps each parameter as soon as its gradient is complete in the backward, and
    that gradient is freed at once (:func:`_steps_in_backward`), so the model's gradients are never all held:
    the same weights and optimizer state bit for bit as ``zero_grad(); backward(); step()`` (tested), with a
    copy of the parameters less at the peak. Other optimizers take the usual step.

    ``recompute_activations`` (the default), for a Hugging Face model that supports it: gradient checkpointing for
    the training only (non-reentrant; turned off again after, unless it was on): each decoder layer's activations
    are recomputed in the backward instead of held, the same weights bit for bit (tested) for one more forward. On
    the main job (SmolLM2-135M, 4 documents of 128 tokens a step) one epoch's peak RSS falls from 3.16 to 2.82 GiB
    for 4% more time (BENCHMARKS.md, run d12)."""
    import time

    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    facts = [d for d in docs if d["id"].startswith("fact/")]
    others = [d for d in docs if not d["id"].startswith("fact/")]
    optimizer = finetune_optimizer(model, lr) if optimizer is None else optimizer
    start, steps, losses = time.perf_counter(), 0, []
    in_backward = step_in_backward and _steps_each_parameter(optimizer)
    model.train()
    optimizer.zero_grad()
    with _steps_in_backward(optimizer) if in_backward else contextlib.nullcontext(lambda: None) as new_backward, \
            _recomputed_activations(model, recompute_activations):
        for _ in range(epochs):
            pool = facts + [others[i] for i in torch.randperm(len(others), generator=g)[:corpus_per_epoch].tolist()]
            order = torch.randperm(len(pool), generator=g).tolist()
            for b in tqdm(range(0, len(order), batch_size), disable=not progress, leave=False, desc="fine-tune"):
                chunk = [pool[i] for i in order[b : b + batch_size]]
                with _autocast(autocast):
                    loss = training_loss(model, tokenizer, chunk, max_length)
                optimizer.zero_grad()
                new_backward()
                loss.backward()  # in_backward: each parameter is stepped here (one backward per step: no accumulation)
                if not in_backward:
                    optimizer.step()
                steps += 1
                losses.append(float(loss.detach()))
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss": sum(losses[-10:]) / min(10, len(losses))}


@contextlib.contextmanager
def _recomputed_activations(model, on: bool):
    """Inside the block, the Hugging Face ``model``'s gradient checkpointing (non-reentrant) is on when ``on`` and
    the model supports it; its own setting is restored after, with the hook that enabling it puts on the input
    embeddings (their output made to require a gradient; transformers leaves it after disabling, and a
    ``requires_grad_`` in every later forward breaks torch.func transforms). transformers 5 names it activation
    checkpointing."""
    renamed = hasattr(model, "activation_checkpointing_enable")
    prefix = "activation" if renamed else "gradient"
    supported = on and getattr(model, "supports_gradient_checkpointing", False) and hasattr(
        model, f"{prefix}_checkpointing_enable")
    was_on = bool(getattr(model, f"is_{prefix}_checkpointing", False))
    had_hook = _has_input_grad_hook(model)
    if supported and not was_on:
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    try:
        yield
    finally:
        if supported and not was_on:
            getattr(model, f"{prefix}_checkpointing_disable")()
            if _has_input_grad_hook(model) and not had_hook:
                model.disable_input_require_grads()


def _has_input_grad_hook(model) -> bool:
    """Whether the Hugging Face ``model`` holds the hook of ``enable_input_require_grads``."""
    return bool(getattr(model, "_require_grads_hooks", None)) or hasattr(model, "_require_grads_hook")


def _steps_each_parameter(optimizer) -> bool:
    """Whether ``optimizer`` is torch's Adam, AdamW or SGD in the form that steps each parameter from its own
    gradient and state alone (not fused, not capturable or differentiable): stepping one parameter at a time
    gives what one step over all of them gives."""
    return (type(optimizer) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
            and not any(group.get(flag) for group in optimizer.param_groups
                        for flag in ("fused", "foreach", "capturable", "differentiable")))


@contextlib.contextmanager
def _steps_in_backward(optimizer):
    """Inside the block, a backward steps each of ``optimizer``'s parameters as soon as its gradient is complete
    (a post-accumulate-grad hook) and frees that gradient, so that at most one parameter's gradient is held at a
    time; the autograd nodes that read a parameter have run by then (a tied weight's hook runs once, on the sum
    of its uses). ``optimizer.step()`` steps only the parameters that have a gradient: here, the one. Yields a
    function to call before each backward: a parameter completed twice within one backward is refused."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise ValueError("optimizer: its parameters hold gradients already; a step in the backward would apply them "
                         "too (call optimizer.zero_grad() first)")
    stepped: set[int] = set()

    def step(param):
        if id(param) in stepped:  # e.g. reentrant checkpointing: a partial gradient each time
            raise RuntimeError("a parameter's gradient was completed twice in one backward, so stepping it in the "
                               "backward would take two steps on partial gradients: fine-tune with "
                               "step_in_backward=False")
        stepped.add(id(param))
        optimizer.step()
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(step) for p in params]
    try:
        yield stepped.clear  # call it before each backward
    finally:
        for handle in handles:
            handle.remove()


def training_loss(model, tokenizer, docs: list[dict], max_length: int, mean: bool = True) -> Tensor:
    """The fine-tuning loss of one batch of ``docs`` (dicts with "text"): the mean next-token
    cross-entropy (nats per target token; ``mean=False``: their sum) over every real token, the documents
    padded to the longest one (cut at ``max_length`` tokens) and moved to the model's device; a scalar
    with its graph."""
    (batch,), _ = llm.document_batches(tokenizer, docs, len(docs), max_length, pad_multiple=1)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    total = llm.chunked_sequence_loss(model, batch).sum()  # the vocabulary-wide logits 128 positions at a time
    return total / batch["loss_mask"][:, 1:].sum() if mean else total


def target_tokens(tokenizer, docs: list[dict], max_length: int) -> int:
    """How many next-token targets :func:`training_loss` averages over for ``docs``."""
    (batch,), _ = llm.document_batches(tokenizer, docs, len(docs), max_length, pad_multiple=1)
    return int(batch["loss_mask"][:, 1:].sum())


def retrieval_metrics(scores: Tensor, doc_ids: list[str], targets: list[str]) -> dict:
    """recall@1, recall@5 and MRR of each query's target document under a [n_query, n_doc] score
    matrix (higher = more relevant; ties broken by the lower index), and each target's rank."""
    ranks = []
    for q, target in enumerate(targets):
        j = doc_ids.index(target)
        s = scores[q]
        better = int((s > s[j]).sum()) + int((s[:j] == s[j]).sum())
        ranks.append(better + 1)
    n = len(ranks)
    return {"recall@1": sum(r <= 1 for r in ranks) / n, "recall@5": sum(r <= 5 for r in ranks) / n,
            "mrr": sum(1.0 / r for r in ranks) / n, "ranks": ranks}


_WORD = re.compile(r"[a-z0-9]+")


def bm25_scores(queries: list[str], docs: list[str]) -> Tensor:
    """Okapi BM25 (the ``rank-bm25`` package, default parameters) of each query against each document,
    on lower-cased word tokens: [n_query, n_doc]."""
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([_WORD.findall(d.lower()) or [""] for d in docs])
    rows = [index.get_scores(_WORD.findall(q.lower())) for q in queries]
    return torch.from_numpy(np.asarray(rows, dtype=np.float64).reshape(len(queries), len(docs)))


# ---- tail-patch: TrackStar's influence metric ---------------------------------------------------------------
TAIL_PATCH_KS = (1, 5, 10)


def _patch_documents(docs) -> list[dict]:
    """``docs`` (texts, or document dicts with "text") as document dicts; an empty list is an error."""
    if isinstance(docs, (str, dict)) or not isinstance(docs, (list, tuple)):
        raise ValueError(f"docs must be a list of texts or of document dicts, got {type(docs).__name__}")
    if not docs:
        raise ValueError("docs is empty: tail-patch takes a training step on at least one document (k >= 1)")
    out = []
    for i, d in enumerate(docs):
        text = d if isinstance(d, str) else d.get("text") if isinstance(d, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"docs[{i}] must be a non-empty text or a dict with a non-empty 'text', got {d!r:.80}")
        out.append({"id": str(d.get("id", i)) if isinstance(d, dict) else str(i), "text": text})
    return out


def _patch_query(query) -> dict:
    """A query dict {"prompt", "completion"} (a :class:`Fact`: its prompt and " " + its answer), checked."""
    if isinstance(query, Fact):
        query = {"id": query.id, "prompt": query.prompt, "completion": " " + query.answer}
    if not isinstance(query, dict) or not isinstance(query.get("prompt"), str) or not isinstance(query.get("completion"), str):
        raise ValueError(f"query must be a Fact or a dict with string 'prompt' and 'completion', got {query!r:.80}")
    if not query["completion"].strip():
        raise ValueError(f"query {query.get('id', query['prompt'][:40])!r}: its completion is empty, so there is no "
                         "answer whose log-probability could change")
    return query


def answer_log_prob(model, tokenizer, query, max_length: int = 128) -> float:
    """log p(completion | prompt) of ``query`` under ``model`` (nats; the sum over the completion's tokens),
    without a gradient; the model's training mode is left as it is."""
    return answer_log_probs(model, tokenizer, [query], max_length)[0]


def answer_log_probs(model, tokenizer, queries: list, max_length: int = 128) -> list[float]:
    """:func:`answer_log_prob` of each of ``queries`` in one forward (one batch, padded to the right: each value
    equals its own forward's up to float rounding), without a gradient."""
    queries = [_patch_query(q) for q in queries]
    (batch,) = llm.query_batches(tokenizer, queries, len(queries), max_length, pad_multiple=1)
    device = next(model.parameters()).device
    with torch.no_grad():
        losses = llm.chunked_sequence_loss(model, {key: value.to(device) for key, value in batch.items()})
    return [-float(loss) for loss in losses.double()]


def true_answer(query: dict) -> dict:
    """The demo's ``query`` (a fact's question, its "target" the fact's id) with the planted fact's own answer as
    its completion (" " + Fact.answer), whatever the model answered: tail-patch on it is TrackStar's definition
    (does a step on the documents raise the true answer), beside the model's own answer (:func:`model_answer`)."""
    fact = next((f for f in FACTS if f.id == query.get("target")), None)
    if fact is None:
        raise ValueError(f"query {query.get('id')!r}: its target {query.get('target')!r} is not a planted fact's id")
    return {"id": query.get("id", fact.id), "prompt": query["prompt"], "completion": _patch_query(fact)["completion"],
            "target": fact.id}


def model_answer(query: dict) -> dict:
    """The demo's ``query`` with the model's own answer as its completion: its "model_answer" (the model's first line,
    kept beside the attributed completion, which ``demo --answer true`` makes the planted fact's answer), or
    ``query`` itself without one (a query written before ``--answer``: its completion is the model's). An empty
    answer is scored as the planted fact's (:func:`true_answer`), as ``--answer own`` attributes it."""
    if "model_answer" not in query:
        return query
    if not query["model_answer"].strip():
        return {**query, "completion": true_answer(query)["completion"]}
    return {**query, "completion": query["model_answer"]}


def tail_patch_answers(query: dict) -> list[dict]:
    """[the model's answer, the planted fact's true answer] of a demo ``query`` (:func:`model_answer`,
    :func:`true_answer`): the two completions each tail-patch step is evaluated on, in this order."""
    return [model_answer(query), true_answer(query)]


def tail_patch(model, optimizer, docs, query, *, tokenizer, lr: float | None = None, max_length: int = 128,
               autocast: torch.dtype | None = None, before: float | None = None, momentum: bool = False) -> float:
    """TrackStar's tail-patch score (Chang et al. 2024) of a method's top documents for a query: the
    change in the log-probability of the query's answer caused by one training step on them.

    One step from the final ``model`` on ``docs`` (the top-k documents: a list of k >= 1 texts or
    document dicts with "text"; one batch of the k documents, the fine-tuning loss of
    :func:`training_loss`: the mean next-token cross-entropy per token, each cut at ``max_length``
    tokens; matmuls in ``autocast`` precision when given, as the training had them), taken by
    ``optimizer``'s class with its hyperparameters and a copy of its state (e.g. AdamW's moments: the step
    the training would take next) at its learning rate (``lr`` overrides it), or, with ``optimizer=None``,
    plain SGD at ``lr``. ``query``: a dict with "prompt" and "completion" (the answer; non-empty) or a
    :class:`Fact`. ``before``: the answer's log-probability under ``model`` when the caller has it
    (:func:`answer_log_prob`; many patches of one query share it). Returns log p_after(completion | prompt)
    - log p_before, in nats (a float: the sum over the completion's tokens; positive: the step made the
    answer more likely).

    ``momentum=False`` (the default) takes the step without the optimizer's momentum (Adam's beta1 and SGD's
    or RMSprop's momentum set to 0; the second moments and step counts are kept), so the step is the documents'
    own gradient preconditioned as the training would: with its momentum, an Adam step is 90% the previous
    steps' direction (beta1 = 0.9), the same for every set of documents, and on the main job k random
    documents then moved the answer as much as its true source (BENCHMARKS.md, "Fact tracing").

    The caller's model, its gradients and its optimizer are not changed (each module's stepped parameters are new
    tensors, swapped in for that module's forward in the evaluation only: :func:`stepped_in_forward`), and dropout
    is off (eval mode), so the result is deterministic. Extra memory: one gradient, and one module's stepped
    parameters at a time."""
    docs, query = _patch_documents(docs), _patch_query(query)
    _check_step(model, optimizer, lr)
    with _evaluation_mode(model):
        if before is None:
            before = answer_log_prob(model, tokenizer, query, max_length)
        grads = _loss_gradients(model, tokenizer, docs, max_length, autocast, mean=True)
        return _after_step(model, optimizer, grads, lr, tokenizer, [query], max_length, momentum)[0] - before


def _check_step(model, optimizer, lr) -> None:
    """Refuse a step that cannot be taken (no positive learning rate, a foreign optimizer) before any backward."""
    if optimizer is None and (lr is None or not lr > 0):
        raise ValueError(f"lr must be a positive learning rate when optimizer is None (plain SGD), got {lr!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer is not None:
        optimizer_groups(optimizer, model, lr)


@contextlib.contextmanager
def _evaluation_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _autocast(dtype: torch.dtype | None):
    """CPU autocast to ``dtype`` (None: none)."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _loss_gradients(model, tokenizer, docs: list[dict], max_length: int, autocast, mean: bool) -> dict[str, Tensor]:
    """{parameter name: gradient} of :func:`training_loss` on one batch of ``docs`` (``mean=False``: of the
    summed token losses instead of their mean); the model's ``.grad`` are not touched."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _autocast(autocast):
        loss = training_loss(model, tokenizer, docs, max_length, mean=mean)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def _after_step(model, optimizer, grads: dict[str, Tensor], lr, tokenizer, queries: list[dict], max_length: int,
                momentum: bool, scale: float = 1.0) -> list[float]:
    """Each query's answer log-probability after one step of ``optimizer`` with ``grads`` times ``scale`` (the model
    is not changed), in one forward: each module's parameters are stepped in its own forward
    (:func:`stepped_in_forward`), so the evaluation holds one module's stepped parameters, not a stepped copy of
    the model."""
    with stepped_in_forward(model, optimizer, grads, lr, momentum, scale):
        return [check_stepped_result(v) for v in answer_log_probs(model, tokenizer, queries, max_length)]


def random_ranking(ids: list[str], seed: int, query_index: int = 0) -> list[str]:
    """A seeded random order of ``ids`` (the "k random documents" reference: its first k), one per query."""
    order = np.random.default_rng([seed, query_index]).permutation(len(ids))
    return [ids[i] for i in order]


def tail_patch_ranking(model, optimizer, corpus: list[dict], query, ranked: list[str], *, tokenizer,
                       ks=TAIL_PATCH_KS, lr: float | None = None, max_length: int = 128,
                       autocast: torch.dtype | None = None, momentum: bool = False) -> dict[int, float | list[float]]:
    """{k: tail_patch on the first k documents of ``ranked``} for each k of ``ks``: a method's ranking
    (document ids of ``corpus``, best first, at least max(ks) of them) of one query (a list of queries: each
    value a list, one per query, as :func:`tail_patch_rankings`)."""
    return tail_patch_rankings(model, optimizer, corpus, query, {"ranked": ranked}, tokenizer=tokenizer, ks=ks, lr=lr,
                               max_length=max_length, autocast=autocast, momentum=momentum)["ranked"]


def tail_patch_rankings(model, optimizer, corpus: list[dict], query, rankings: dict[str, list[str]], *, tokenizer,
                        ks=TAIL_PATCH_KS, lr: float | None = None, max_length: int = 128,
                        autocast: torch.dtype | None = None,
                        momentum: bool = False) -> dict[str, dict[int, float | list[float]]]:
    """{name: {k: tail_patch on the first k documents of rankings[name]}} for several rankings of one query (each a
    list of document ids of ``corpus``, best first, at least max(k) long). ``ks``: the ks of every ranking, or a
    dict {name: its ks}. A set of documents is stepped on once: a prefix with the same documents as one already
    measured (two-stage re-ranking BM25's top 10 has BM25's top-10 set; BM25's top 1 is often the source) reuses
    its number, and a ranking's documents past its last new prefix get no backward.

    ``query`` may be a list of queries (e.g. the model's answer and the true one, :func:`true_answer`): each step is
    then evaluated on all of them in one forward, and each value is a list, one per query in their order."""
    if not isinstance(rankings, dict) or not rankings:
        raise ValueError(f"rankings must be a non-empty dict {{name: ranked document ids}}, got {rankings!r:.80}")
    per_name = {name: _checked_ks(ks[name] if isinstance(ks, dict) else ks, name) for name in rankings}
    by_id = {str(d["id"]): d for d in corpus}
    for name, ranked in rankings.items():
        unknown = [r for r in ranked if str(r) not in by_id]
        if unknown:
            raise ValueError(f"ranked holds ids that are not in the corpus: {unknown[:5]}")
        if len(ranked) < per_name[name][-1]:
            raise ValueError(f"ranked lists {len(ranked)} documents, fewer than k = {per_name[name][-1]}")
    several = isinstance(query, (list, tuple))
    if several and not query:
        raise ValueError("query: an empty list; give a query, or a list of queries evaluated after the same steps")
    queries = [_patch_query(q) for q in (query if several else [query])]
    _check_step(model, optimizer, lr)
    measured: dict[frozenset, list[float]] = {}
    out = {}
    with _evaluation_mode(model):
        before = answer_log_probs(model, tokenizer, queries, max_length)
        for name, ranked in rankings.items():
            docs = [by_id[str(r)] for r in ranked[: per_name[name][-1]]]
            patches = _prefix_tail_patches(model, optimizer, docs, queries, per_name[name], measured, before=before,
                                           tokenizer=tokenizer, lr=lr, max_length=max_length, autocast=autocast,
                                           momentum=momentum)
            out[name] = patches if several else {k: values[0] for k, values in patches.items()}
    return out


def _checked_ks(ks, name: str) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive numbers of documents, got {ks!r} for {name!r} (k = 0 documents: no "
                         "step to take)")
    return ks


def _prefix_tail_patches(model, optimizer, docs: list[dict], queries: list[dict], ks: list[int],
                         measured: dict[frozenset, list[float]], *, before: list[float], tokenizer, lr, max_length: int,
                         autocast, momentum: bool) -> dict[int, list[float]]:
    """{k: [tail_patch(docs[:k]) of each of ``queries``]} for ascending ``ks``, with each document in one forward
    and backward instead of one per (k, document): the gradient of a batch's mean token loss is the sum of its
    documents' summed-loss gradients over its count of target tokens (padding to the right changes no real token's
    loss), so the gradients of the segments between consecutive ks (docs[0:1], docs[1:5], docs[5:10] for ks 1, 5,
    10; each in backward parts of at most :data:`BACKWARD_TOKENS` tokens) are accumulated in rank order, in place,
    and a step is taken at each k, evaluated on every query in one forward. Equal to :func:`tail_patch` on each
    prefix up to float rounding. ``before``: each query's log-probability before any step. ``measured``: {set of
    document ids: the tail-patches} of the queries so far, read (a prefix already there is not stepped again) and
    updated."""
    sets = {k: frozenset(d["id"] for d in docs[:k]) for k in ks}
    new = [k for k in ks if sets[k] not in measured]
    if new:
        tokens, start = 0, 0
        with _accumulated_gradients(model) as accumulated:
            for k in (k for k in ks if k <= new[-1]):
                segment = docs[start:k]
                for part in _backward_parts(tokenizer, segment, max_length):
                    with _autocast(autocast):
                        loss = training_loss(model, tokenizer, part, max_length, mean=False)
                    loss.backward()
                    del loss
                tokens, start = tokens + target_tokens(tokenizer, segment, max_length), k
                if sets[k] not in measured:
                    after = _after_step(model, optimizer, accumulated(), lr, tokenizer, queries, max_length, momentum,
                                        scale=1.0 / tokens)
                    measured[sets[k]] = [a - b for a, b in zip(after, before)]
    return {k: measured[sets[k]] for k in ks}


BACKWARD_TOKENS = 128  # tail-patch's backward passes: at most this many tokens each (one document if longer)


def _backward_parts(tokenizer, docs: list[dict], max_length: int) -> list[list[dict]]:
    """``docs`` cut, in order, into runs of at most :data:`BACKWARD_TOKENS` tokens (each cut at ``max_length``), one
    backward each: the summed loss's gradient is the sum of its parts' (up to float rounding), and a backward holds
    one part's activations instead of the whole segment's."""
    parts, size = [], 0
    for doc, (ids, _) in zip(docs, llm.document_tokens(tokenizer, docs, max_length)):
        n = len(ids)
        if parts and size + n <= BACKWARD_TOKENS:
            parts[-1].append(doc)
            size += n
        else:
            parts.append([doc])
            size = n
    return parts


@contextlib.contextmanager
def _accumulated_gradients(model):
    """Inside the block, backward passes add up in place in the ``.grad`` of ``model``'s trainable parameters (from
    none: the caller's ``.grad`` are set aside and put back after); yields a function that returns {name: the sum
    so far} (the ``.grad`` tensors themselves). In place, the sum costs no second copy of the gradients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kept = [p.grad for _, p in named]
    try:
        for _, p in named:
            p.grad = None
        yield lambda: {n: p.grad for n, p in named if p.grad is not None}
    finally:
        for (_, p), grad in zip(named, kept):
            p.grad = grad


def tail_patch_references(model, optimizer, corpus: list[dict], query, source: str, *, tokenizer, ks=TAIL_PATCH_KS,
                          seed: int = 0, query_index: int = 0, lr: float | None = None,
                          max_length: int = 128, autocast: torch.dtype | None = None, momentum: bool = False) -> dict:
    """The two references of a query's tail-patch: {"random": {k: tail-patch on k random documents
    (:func:`random_ranking`, seeded by ``seed`` and ``query_index``)}, "source": tail-patch on the true
    source document (id ``source``) alone}."""
    ids = [str(d["id"]) for d in corpus]
    if str(source) not in ids:
        raise ValueError(f"source {source!r} is not a document id of the corpus")
    patches = tail_patch_rankings(model, optimizer, corpus, query, reference_rankings(ids, source, seed, query_index),
                                  ks={"random": ks, "source": (1,)}, tokenizer=tokenizer, lr=lr, max_length=max_length,
                                  autocast=autocast, momentum=momentum)
    return {"random": patches["random"], "source": patches["source"][1]}


def reference_rankings(ids: list[str], source: str, seed: int, query_index: int) -> dict[str, list[str]]:
    """{"random": :func:`random_ranking`, "source": [source]}: the rankings of a query's two tail-patch references
    (the source alone is stepped on at k = 1 only)."""
    return {"random": random_ranking(ids, seed, query_index), "source": [str(source)]}


def tail_patch_summary(per_query: list[dict[int, float]]) -> dict[int, dict]:
    """{k: {"mean", "se", "n"}} over the queries of per-query {k: tail-patch} dicts (the same ks in each):
    the mean change of the answer's log-probability (nats) and its standard error (sample standard
    deviation / sqrt(n); nan for one query)."""
    if not per_query:
        raise ValueError("per_query is empty: no query to average over")
    ks = sorted(per_query[0])
    if any(sorted(row) != ks for row in per_query):
        raise ValueError(f"per_query: every query needs the same ks {ks}")
    out = {}
    for k in ks:
        mean, se = mean_and_standard_error([row[k] for row in per_query])
        out[k] = {"mean": mean, "se": se, "n": len(per_query)}
    return out
