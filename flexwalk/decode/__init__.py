"""Sparse decode: a per-layer SketchWalk state carried across generation steps.

`state.DecodeState` is built from a layer's prefill and absorbs every new token;
`scoring` holds how a token scores the key blocks (and which prompt blocks are pinned);
`step.sketchwalk_decode` runs one decode step of one layer: update, select, attend.
"""
