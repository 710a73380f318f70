"""Token batches and the per-sample loss.

A batch is a dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] and ``loss_mask`` [B, T] (which
target tokens count: every real token of a training document; only the completion of a query).
The per-sample loss is the summed next-token cross-entropy over the masked targets.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def document_tokens(tokenizer, docs: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, target mask) of each training document: every token of a "text" document (cut at
    ``max_length``), or only the completion of a "prompt" + "completion" document (an instruction or
    chat example; its prompt is cut from the left). A document with no target token is an error naming it."""
    out = []
    for d in docs:
        if "completion" in d:
            out.append(query_tokens(tokenizer, {**d, "id": d["id"]}, max_length))
            continue
        ids = tokenizer(d["text"], truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < 2:
            raise ValueError(f"document {d['id']!r} has {len(ids)} token(s): no next-token target to score "
                             "(remove it from the corpus)")
        out.append((list(ids), [1] * len(ids)))
    return out


def length_batches(lengths: list[int], token_batch_size: int | None = None, batch_size: int | None = None,
                   pad_multiple: int = 1) -> list[list[int]]:
    """Group documents into batches, longest first: each batch is padded only to its own longest
    document (rounded up to ``pad_multiple``) and holds at most ``token_batch_size`` padded tokens and
    ``batch_size`` documents. Returns the document indices of each batch (a pure function of the
    lengths: ties keep the corpus order)."""
    if token_batch_size is None and batch_size is None:
        raise ValueError("give token_batch_size or batch_size")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        width = -(-lengths[i] // pad_multiple) * pad_multiple
        if batches:
            current = batches[-1]
            padded = -(-lengths[current[0]] // pad_multiple) * pad_multiple
            fits_tokens = token_batch_size is None or (len(current) + 1) * padded <= token_batch_size
            fits_rows = batch_size is None or len(current) < batch_size
            if fits_tokens and fits_rows:
                current.append(i)
                continue
        if token_batch_size is not None and width > token_batch_size:
            raise ValueError(f"a document of {lengths[i]} tokens does not fit --token-batch-size {token_batch_size}")
        batches.append([i])
    return batches


def pad_batch(rows: list[list[int]], targets: list[list[int]], pad_id: int, pad_multiple: int = 1) -> dict:
    """Right-padded batch dict (input_ids, attention_mask, loss_mask) of token rows and target masks."""
    width = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
    ids = [r + [pad_id] * (width - len(r)) for r in rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    loss = [t + [0] * (width - len(t)) for t in targets]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "loss_mask": torch.tensor(loss)}


def document_batches(tokenizer, docs: list[dict], batch_size: int | None, max_length: int,
                     token_batch_size: int | None = None, pad_multiple: int = 8) -> tuple[list[dict], list[int]]:
    """Batches of training documents for the cache stage, with no compute on padding: documents are
    grouped by length (see :func:`length_batches`) and each batch is padded to its longest document.
    Every real token is a target. Returns (batches, order): order[r] is the index in ``docs`` of the
    r-th cached row."""
    tokens = document_tokens(tokenizer, docs, max_length)
    groups = length_batches([len(ids) for ids, _ in tokens], token_batch_size, batch_size, pad_multiple)
    batches = [pad_batch([tokens[i][0] for i in g], [tokens[i][1] for i in g], tokenizer.pad_token_id, pad_multiple)
               for g in groups]
    return batches, [i for g in groups for i in g]


def query_tokens(tokenizer, query: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, target mask) of prompt + completion. A prompt that does not fit is cut from the
    left, so the completion (what is being explained) is always kept whole."""
    label = query.get("id", str(query.get("prompt"))[:60])
    for field in ("prompt", "completion"):
        if not isinstance(query.get(field), str):
            raise ValueError(f"query {label!r}: {field} must be a string, got {type(query.get(field)).__name__}")
    prompt = tokenizer(query["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(query["completion"], add_special_tokens=False)["input_ids"]
    if not completion:
        raise ValueError(f"query {label!r} has an empty completion: no token to attribute")
    if len(completion) > max_length:
        raise ValueError(f"the completion of query {label!r} has {len(completion)} tokens, more than --max-length "
                         f"{max_length} allows; raise --max-length")
    room = max_length - len(completion)
    prompt = prompt[len(prompt) - room:] if len(prompt) > room else prompt
    targets = [0] * len(prompt) + [1] * len(completion)
    if not prompt:  # the first token has no prediction: it cannot be a target
        targets[0] = 0
        if sum(targets) == 0:
            raise ValueError(f"query {label!r}: its completion has a single token and no prompt: nothing to score")
    return prompt + completion, targets


def per_token_queries(tokenizer, query: dict, max_length: int) -> list[dict]:
    """One query per completion token: the same tokens, with only that token as the target (its own
    loss gradient), so the cost is one query per completion token. Each carries ``token`` (its text)
    and ``position`` (its index among the completion's targets)."""
    ids, targets = query_tokens(tokenizer, query, max_length)
    positions = [i for i, t in enumerate(targets) if t]
    return [{**query, "ids": ids, "targets": [int(i == p) for i in range(len(ids))], "position": n,
             "token": tokenizer.decode([ids[p]])} for n, p in enumerate(positions)]


def encoded_batches(tokenizer, encoded: list[tuple[list[int], list[int]]], batch_size: int | None,
                    token_batch_size: int | None = None, pad_multiple: int = 8) -> list[dict]:
    """Batches of (token ids, target mask) rows in their given order, each padded to its longest row."""
    batches, current = [], []
    for seq, target in encoded:
        width = -(-max([len(seq)] + [len(s) for s, _ in current]) // pad_multiple) * pad_multiple
        too_many = (batch_size is not None and len(current) >= batch_size) or (
            token_batch_size is not None and (len(current) + 1) * width > token_batch_size)
        if current and too_many:
            batches.append(current)
            current = []
        current.append((seq, target))
    if current:
        batches.append(current)
    return [pad_batch([s for s, _ in b], [t for _, t in b], tokenizer.pad_token_id, pad_multiple) for b in batches]


def query_batches(tokenizer, queries: list[dict], batch_size: int | None, max_length: int,
                  token_batch_size: int | None = None, pad_multiple: int = 8) -> list[dict]:
    """Batches of (prompt, completion) queries in their given order (rows = queries), each padded to
    its longest sequence; only the completion's tokens are targets (queries from
    :func:`per_token_queries` keep their single target)."""
    encoded = [(q["ids"], q["targets"]) if "ids" in q else query_tokens(tokenizer, q, max_length) for q in queries]
    return encoded_batches(tokenizer, encoded, batch_size, token_batch_size, pad_multiple)


def sequence_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample summed next-token cross-entropy over ``loss_mask`` targets -> [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # half precisions: in float32
    token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (token_loss * batch["loss_mask"][:, 1:].to(token_loss.dtype)).sum(1)


LOSS_CHUNK_TOKENS = 128  # target positions whose vocabulary-wide logits a chunked loss forms at once
# causal LMs whose forward is exactly lm_head(decoder(...)) (no logit scaling or soft-capping), checked by class name
_PLAIN_HEADS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def chunked_sequence_loss(model: nn.Module, batch: dict, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> Tensor:
    """:func:`sequence_loss` [B] with the output layer applied to ``chunk_tokens`` target positions at a time, only
    where ``loss_mask`` counts them: the [B, T, vocabulary] logits (and their float32 copy, log-softmax and gradient)
    are never formed whole. Under autograd each chunk's logits are formed again in the backward (activation
    checkpointing: ``chunk_tokens`` rows of logits held, for one more output-layer matmul). Models whose forward is
    not exactly ``lm_head(decoder(...))`` (:data:`_PLAIN_HEADS`, by class) take :func:`sequence_loss` itself. Equal
    to it up to float rounding (the output layer's weight gradient sums the rows in chunks)."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive number of positions, got {chunk_tokens!r}")
    if type(model).__name__ not in _PLAIN_HEADS:
        return sequence_loss(model, batch)
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    counted = batch["loss_mask"][:, 1:] != 0
    rows = hidden[:, :-1][counted]  # [N, H]: the positions whose next token is a target
    targets = batch["input_ids"][:, 1:][counted]
    weights = batch["loss_mask"][:, 1:][counted]
    losses = []
    for start in range(0, rows.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            losses.append(checkpoint(_rows_loss, head, rows[piece], targets[piece], use_reentrant=False))
        else:
            losses.append(_rows_loss(head, rows[piece], targets[piece]))
    dtype = hidden.dtype if hidden.dtype in (torch.float32, torch.float64) else torch.float32
    token_loss = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=dtype)
    dense = token_loss.new_zeros(counted.shape)  # [B, T-1]: summed as sequence_loss sums, in its order
    dense = dense.index_put((counted.nonzero(as_tuple=True)), token_loss * weights.to(token_loss.dtype))
    return dense.sum(1)


def _rows_loss(head: nn.Module, rows: Tensor, targets: Tensor) -> Tensor:
    """Next-token cross-entropy [N] of ``rows`` [N, H] of final hidden states against ``targets`` [N] (half-precision
    logits in float32, as :func:`sequence_loss` takes them)."""
    logits = head(rows)
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return nn.functional.cross_entropy(logits, targets, reduction="none")
