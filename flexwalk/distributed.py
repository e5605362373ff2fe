"""Tensor parallelism: each rank holds an equal share of a layer's heads, and every rank must
select the blocks that one process holding every head would.

The selection averages the ranks' head means (or, per-head scoring, their transitions) with
one all-reduce per layer (`group_mean`); sparse decode averages its token's head means the same
way and agrees on a staleness verdict (`group_any`).  `tensor_parallel_group` finds the group of
a layer whose rank holds part of the heads; `mesh_group` reads it off a model's device mesh.
"""

from __future__ import annotations

import torch


def group_mean(x: torch.Tensor, group) -> torch.Tensor:
    """Mean of x over the ranks of a process group (one all-reduce; equal head shares per rank).
    x itself is left as it is: the all-reduce runs on a copy (x may be a view of a layer's keys,
    as the head mean of a rank holding one KV head is)."""
    import torch.distributed as dist

    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x / dist.get_world_size(group)


def group_any(flag: torch.Tensor, group) -> torch.Tensor:
    """0-d bool: whether `flag` (a 0-d bool) is set on any rank of the group (one all-reduce)."""
    import torch.distributed as dist

    x = flag.to(torch.int32).reshape(1)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x.reshape(()).bool()


def tensor_parallel_group(total_heads: int | None, local_heads: int, group=None):
    """The process group of a tensor-parallel attention layer, or None when this rank holds every
    query head (`local_heads` of the model's `total_heads`; None: not known, taken as all).
    group: the group the model was configured with (`mesh_group`); without one, the default
    world when its size is the parallel degree.  NotImplementedError when the heads are not
    shared equally or no group of the right size is found."""
    if not isinstance(total_heads, int) or local_heads >= total_heads:
        return None
    if total_heads % local_heads:
        raise NotImplementedError(
            f"sketchwalk_flex under tensor parallelism with unequal head shares ({local_heads} of {total_heads} "
            "query heads)")
    degree = total_heads // local_heads
    import torch.distributed as dist

    if group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() == degree:
        group = dist.group.WORLD  # tp_plan="auto" shards over the whole world by default
    if group is None or dist.get_world_size(group) != degree:
        raise NotImplementedError(
            f"sketchwalk_flex under tensor parallelism: this rank holds {local_heads} of {total_heads} query heads "
            f"and no process group of {degree} ranks was found (the default world has "
            f"{dist.get_world_size() if dist.is_available() and dist.is_initialized() else 'no'} ranks); call "
            "flexwalk.configure(model) after from_pretrained(..., tp_plan=...) so the model's device mesh is used")
    return group


def mesh_group(model: torch.nn.Module):
    """The tensor-parallel process group of a model loaded with tp_plan (its device mesh), or None."""
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is None:
        return None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tp" in names:
        return mesh.get_group("tp")
    if mesh.ndim == 1:
        return mesh.get_group()
    raise NotImplementedError(f"sketchwalk_flex: a {mesh.ndim}-D device mesh without a 'tp' dimension ({names})")
