"""A small causal language model trained from scratch on CPU, for LDS on text (the shape of the GraSS
paper's Table 1(d), GPT-2 on WikiText there).

* Text: the documentation topics that ship with Python (``pydoc_data.topics``, ~465k characters), so
  nothing is downloaded. Characters are the tokens (a sorted vocabulary of the characters present).
* Sequences: non-overlapping windows of ``length + 1`` characters, shuffled with a seeded generator;
  the first ``n_train`` are the training set, the next ``n_test`` the held-out queries.
* Model: a pre-LayerNorm GPT (token + learned position embeddings, ``layers`` blocks of causal
  self-attention and a 4x MLP, an untied head). Its linear layers are plain ``nn.Linear``.
* Loss (what is attributed): the summed next-token cross-entropy of a sequence. LDS output function:
  minus the mean next-token loss of each held-out sequence (higher = better).
* Training: AdamW, a fixed number of epochs, batches in a seeded order. ``train_lm(indices, seed)``
  starts every model from the same initialization (``init_seed``) and uses ``seed`` for the data
  order, like retraining a fine-tuned model from one pretrained start; the retrained models of an LDS
  then differ by their data and its order only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LMConfig:
    length: int = 64  # tokens per sequence (the windows hold length + 1 characters)
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    n_train: int = 2000
    n_test: int = 100
    epochs: int = 6
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    init_seed: int = 0
    data_seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def corpus_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class CharData:
    """Tokenized train / test sequences [n, length + 1] (int64) and the vocabulary."""

    def __init__(self, config: LMConfig):
        text = corpus_text()
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
        width = config.length + 1
        windows = ids[: len(ids) // width * width].reshape(-1, width)
        if config.n_train + config.n_test > len(windows):
            raise ValueError(f"the corpus holds {len(windows)} sequences of {width} characters, fewer than "
                             f"n_train + n_test = {config.n_train + config.n_test}")
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.data_seed))
        self.train = windows[order[: config.n_train]]
        self.test = windows[order[config.n_train : config.n_train + config.n_test]]


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        attention = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        h = h + self.proj(attention.transpose(1, 2).reshape(b, t, d))
        return h + self.out(nn.functional.gelu(self.fc(self.ln2(h))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, config: LMConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab, config.d_model)
        self.position = nn.Parameter(torch.zeros(config.length, config.d_model))
        self.blocks = nn.ModuleList(Block(config.d_model, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def token_losses(model: nn.Module, sequences: Tensor) -> Tensor:
    """[n, length]: next-token cross-entropy of each position of sequences [n, length + 1]."""
    logits = model(sequences[:, :-1])
    return nn.functional.cross_entropy(logits.transpose(1, 2), sequences[:, 1:], reduction="none")


def sequence_loss(model: nn.Module, batch) -> Tensor:
    """The attributed per-sample loss: summed next-token loss of each sequence [B]."""
    sequences = batch[0] if isinstance(batch, (tuple, list)) else batch
    return token_losses(model, sequences).sum(1)


def make_model(vocab: int, config: LMConfig) -> TinyGPT:
    torch.manual_seed(config.init_seed)
    return TinyGPT(vocab, config)


def train_lm(data: CharData, config: LMConfig, indices: Tensor, seed: int) -> TinyGPT:
    """A model trained on data.train[indices] from the shared initialization; ``seed``: the data order."""
    model = make_model(len(data.vocab), config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sequences = data.train[indices]
    gen = torch.Generator().manual_seed(seed)
    steps = config.epochs * math.ceil(len(sequences) / config.batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(sequences), generator=gen).split(config.batch):
            opt.zero_grad()
            token_losses(model, sequences[idx]).mean().backward()
            opt.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def heldout_output(model: nn.Module, data: CharData) -> Tensor:
    """LDS output [n_test]: minus the mean next-token loss of each held-out sequence."""
    return -token_losses(model, data.test).mean(1)


def batches(sequences: Tensor, size: int) -> list[tuple[Tensor]]:
    return [(sequences[i : i + size],) for i in range(0, len(sequences), size)]


def block_layers(model: TinyGPT) -> list[str]:
    """The attributed layers: every linear layer of the transformer blocks (not the head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")]


__all__ = ["LMConfig", "CharData", "TinyGPT", "make_model", "train_lm", "sequence_loss", "token_losses",
           "heldout_output", "batches", "block_layers", "corpus_text"]
