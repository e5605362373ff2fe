"""Greedy generation with a KV cache, timed: one prompt (`greedy`) or a left-padded batch
(`greedy_batch`), as the demo, the NIAH harness and the figures run it."""

from __future__ import annotations

import time

import torch

from .integrations.cache_kwarg import cache_kwargs, returned_cache

def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model, input_ids: list[int], max_new_tokens: int, eos_ids: set[int]):
    """Greedy decoding with a KV cache: (new token ids, prefill seconds, total seconds, all logits finite)."""
    device = model.device
    ids = torch.tensor([input_ids], device=device)
    sync(device)
    t0 = time.perf_counter()
    # logits_to_keep=1: the full [T, vocab] logits would cost more memory than the model.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    sync(device)
    prefill = time.perf_counter() - t0
    new, finite = [], True
    for _ in range(max_new_tokens):
        finite = finite and bool(torch.isfinite(logits).all())
        token = int(logits.argmax(-1))
        new.append(token)
        if token in eos_ids or len(new) == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[token]], device=device), **cache_kwargs(returned_cache(out)), use_cache=True)
        logits = out.logits[:, -1]
    sync(device)
    return new, prefill, time.perf_counter() - t0, finite


@torch.no_grad()
def greedy_batch(model, batch_ids: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int):
    """`greedy` for several prompts at once: ([(new token ids, all logits finite)] per row,
    prefill seconds, total seconds) of the whole batch.

    Prompts of different lengths are padded on the left with `pad_id` and masked out
    (attention_mask 0); positions count real tokens only, as generate() computes them.  A batch
    without padding (one row, or rows of one length) passes no mask, exactly like `greedy`.  A
    row stops at (and includes) its first EOS; it is then fed `pad_id` until every row has
    stopped or max_new_tokens were generated.  The tokens stay on the device; the host reads
    one "all rows stopped" flag per step (on CUDA without stalling the queue: the flag of step
    t is read while step t+1 runs, which may cost one discarded step at the end).
    """
    if not batch_ids or any(len(r) == 0 for r in batch_ids):
        raise ValueError("greedy_batch: every row needs at least one prompt token")
    device = model.device
    rows, n = len(batch_ids), max(len(r) for r in batch_ids)
    ids = torch.full((rows, n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((rows, n + max_new_tokens), dtype=torch.long)
    for i, r in enumerate(batch_ids):
        ids[i, n - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, n - len(r):] = 1
    padded = any(len(r) != n for r in batch_ids)
    ids, mask = ids.to(device), mask.to(device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    pad = torch.full((rows,), int(pad_id), dtype=torch.long, device=device)
    tokens = torch.empty((rows, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    finite = torch.ones(rows, dtype=torch.bool, device=device)
    cuda = device.type == "cuda"
    if cuda:  # "all rows stopped" of each step, copied to the host without a sync
        flags = torch.zeros(max_new_tokens, dtype=torch.bool, pin_memory=True)
        event = torch.cuda.Event()
    kw: dict = {}
    if padded:
        # Left padding: positions from the mask, as generate() does (transformers 5 models take
        # position_ids as given, else count from the cache, which would count the padding).
        prompt_mask = mask[:, :n]
        kw = dict(attention_mask=prompt_mask,
                  position_ids=(prompt_mask.cumsum(-1) - 1).masked_fill_(prompt_mask == 0, 1))
        last_pos = prompt_mask.sum(-1, keepdim=True) - 1  # [rows, 1]: each row's last prompt position
    sync(device)
    t0 = time.perf_counter()
    # logits_to_keep=1: the full [T, vocab] logits would cost more memory than the model.
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    logits = out.logits[:, -1]
    sync(device)
    prefill = time.perf_counter() - t0
    steps = 0
    for step in range(max_new_tokens):
        finite &= done | torch.isfinite(logits).all(-1)
        token = torch.where(done, pad, logits.argmax(-1))
        tokens[:, step] = token
        done |= torch.isin(token, eos)
        steps = step + 1
        if steps == max_new_tokens:
            break
        if cuda:
            flags[step].copy_(done.all(), non_blocking=True)
            event.record()
        elif bool(done.all()):
            break
        if padded:
            kw = dict(attention_mask=mask[:, : n + steps], position_ids=last_pos + steps)
        out = model(input_ids=token[:, None], **cache_kwargs(returned_cache(out)), use_cache=True, **kw)
        if cuda:
            event.synchronize()  # waits for this step's flag, not for the forward just queued
            if bool(flags[step]):
                break
        logits = out.logits[:, -1]
    new = tokens[:, :steps].tolist()
    done_rows, finite_rows = done.tolist(), finite.tolist()
    sync(device)
    total = time.perf_counter() - t0
    result = []
    for row, row_done, row_finite in zip(new, done_rows, finite_rows):
        if row_done:  # cut after the first EOS (later entries are padding)
            row = row[: next(i for i, t in enumerate(row) if t in eos_ids) + 1]
        result.append((row, bool(row_finite)))
    return result, prefill, total


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
    flat: set[int] = set()
    for i in ids:
        flat.update(i if isinstance(i, (list, tuple)) else [i])
    return {i for i in flat if i is not None}


def pad_id(tokenizer, eos: set[int]) -> int:
    """The token that left-pads a batch: the tokenizer's pad token, else EOS, else 0."""
    for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(i, int):
            return i
    return min(eos) if eos else 0
