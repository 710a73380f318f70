"""A tiny demo folder for the scripts that read one (``demo --out``): the tiny Llama's weights, an AdamW state after
one step, a corpus of 3 planted facts and ``fillers`` short documents, and 3 questions (the model's answer differs
from the true one; every other question answered right). facts.json is the caller's to write."""
import json
import shutil
from pathlib import Path

import torch


def tiny_demo_folder(tiny_llama: Path, tmp_path: Path, fillers: int = 10):
    """(folder, model, tokenizer, corpus, queries) of a fresh demo folder under ``tmp_path``."""
    from attribution import llm
    from attribution.evaluation import facts
    from attribution.llm import demo

    folder = tmp_path / "demo"
    shutil.copytree(tiny_llama, folder / "model")
    model, tok = llm.load_model(str(folder / "model"))
    planted = facts.FACTS[:3]
    words = "the a for loop lambda assert python list data privacy statement expression creates function".split()
    corpus = [{"id": f.id, "text": " ".join(words[i:i + 4])} for i, f in enumerate(planted)]
    corpus += [{"id": f"d{i}", "text": " ".join(words[i:i + 3])} for i in range(fillers)]
    optimizer = facts.finetune_optimizer(model, demo.FINETUNE_LR)
    facts.training_loss(model, tok, corpus[:2], 16).backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / demo.OPTIMIZER_FILE)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    queries = [{"id": f.id, "prompt": "the data", "completion": " privacy statement", "model_answer": " a list",
                "target": f.id, "correct": i % 2 == 0} for i, f in enumerate(planted)]
    return folder, model, tok, corpus, queries
