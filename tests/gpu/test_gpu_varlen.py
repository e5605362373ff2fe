"""Packed (varlen) prefill on CUDA: every sequence of a packed batch equals its solo run, with
the CUDA-graphed selection in use and several sequences in one length bucket (their selection
graph replays one after the other before the packed kernel reads the tables).

    python -m pytest -q tests/gpu/test_gpu_varlen.py      # needs a CUDA GPU (make test-gpu)

CPU runs skip it all; tests/test_varlen.py checks the same on the CPU (no graphs there).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import flexwalk
from flexwalk import sketchwalk_attention, sketchwalk_varlen_attention
from gpu_inputs import inputs, sparse_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# two pairs of one bucket each, a short one (dense below 3000 tokens) and a long one
LENGTHS = [8192, 8000, 16384, 16000, 2048, 30000]


@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_each_packed_sequence_equals_its_solo_run(kernel):
    cfg = sparse_config("128", dense_below=3000)
    seqs = [inputs(1, 32, 8, n, 128, seed=i)[:3] for i, n in enumerate(LENGTHS)]
    q, k, v = (torch.cat([s[j][0].transpose(0, 1) for s in seqs]) for j in range(3))
    cu = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32, device=q.device)
    with flexwalk.options(prefill_kernel=kernel):
        flexwalk.reset_counters()
        state = None
        outs = []
        for layer in range(2):  # the walk carried across two layers, per sequence
            out, state = sketchwalk_varlen_attention(q, k, v, cu, max(LENGTHS), cfg, layer, state)
            outs.append(out)
        assert flexwalk.counters().get("sparse_prefill", 0) == 2 * 5  # the 2048-token sequence runs dense
        for s, (a, b) in zip(seqs, itertools.pairwise(cu.tolist())):
            st = None
            for layer in range(2):
                solo, st = sketchwalk_attention(*s, cfg, layer, st)
                solo = solo[0].transpose(0, 1)
                err = (outs[layer][a:b].float() - solo.float()).abs().max().item()
                assert err <= 4 * torch.finfo(q.dtype).eps * solo.float().abs().max().item(), (b - a, layer, err)


@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_a_packed_call_with_host_cu_seqlens_does_not_synchronise(kernel):
    """After a warm-up call, a packed call whose cu_seqlens is a host tensor (as vLLM passes it)
    runs its selections and kernel without a host synchronisation (torch's sync debug mode
    raises on one), and gives the same output as with cu_seqlens on the GPU."""
    cfg = sparse_config("128", dense_below=3000)
    seqs = [inputs(1, 32, 8, n, 128, seed=i)[:3] for i, n in enumerate(LENGTHS)]
    q, k, v = (torch.cat([s[j][0].transpose(0, 1) for s in seqs]) for j in range(3))
    cu_host = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32)
    with flexwalk.options(prefill_kernel=kernel):
        ref, state = sketchwalk_varlen_attention(q, k, v, cu_host.cuda(), max(LENGTHS), cfg, 0)
        sketchwalk_varlen_attention(q, k, v, cu_host, max(LENGTHS), cfg, 1, state)  # warm-up: compiles, graphs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, state = sketchwalk_varlen_attention(q, k, v, cu_host, max(LENGTHS), cfg, 0)
            sketchwalk_varlen_attention(q, k, v, cu_host, max(LENGTHS), cfg, 1, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, ref)
