"""Fact tracing: a measurement that attribution works on a language model.

Twenty invented facts (a fictional town, its founder, a year, ...) are planted in the corpus, one
document each, written as natural paragraphs. The embedded model is briefly fine-tuned on the corpus
(seeded, on CPU), then asked each fact with a paraphrased question; the model's own answer is the
completion to explain. A method works when it ranks the fact's source document first: recall@1,
recall@5 and the mean reciprocal rank (MRR) of the source document over the twenty queries.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import llm


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


def finetune(model, tokenizer, docs: list[dict], epochs: int = 6, lr: float = 2e-4, batch_size: int = 4,
             max_length: int = 128, seed: int = 0, corpus_per_epoch: int = 12, progress: bool = False,
             autocast: torch.dtype | None = None) -> dict:
    """Briefly fine-tune ``model`` in place (AdamW, float32 weights; matmuls in ``autocast`` precision
    when given): each epoch sees every fact document and ``corpus_per_epoch`` other documents of the
    corpus (a seeded sample), in a seeded order; returns {"steps", "seconds", "loss"}."""
    import contextlib
    import time

    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    facts = [d for d in docs if d["id"].startswith("fact/")]
    others = [d for d in docs if not d["id"].startswith("fact/")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, steps, losses = time.perf_counter(), 0, []
    model.train()
    for _ in range(epochs):
        pool = facts + [others[i] for i in torch.randperm(len(others), generator=g)[:corpus_per_epoch].tolist()]
        order = torch.randperm(len(pool), generator=g).tolist()
        for b in tqdm(range(0, len(order), batch_size), disable=not progress, leave=False, desc="fine-tune"):
            chunk = [pool[i] for i in order[b : b + batch_size]]
            (batch,), _ = llm.document_batches(tokenizer, chunk, len(chunk), max_length, pad_multiple=1)
            with torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext():
                loss = llm.sequence_loss(model, batch).sum() / batch["loss_mask"][:, 1:].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(float(loss.detach()))
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss": sum(losses[-10:]) / min(10, len(losses))}


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
