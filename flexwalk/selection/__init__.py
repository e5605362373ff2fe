"""Block selection: which key blocks each query block of a layer attends.

Data flows sketch -> walk -> topk: block means and their sketches give the layer's block
transition W_l (`sketch`), the walk across layers turns it into scores R_l (`walk`), and the
budget rule keeps the top blocks of each row (`topk`).  `driver` runs the three, in torch ops
or fused (compiled, Triton, CUDA graphs), into the tables the attention kernels read.
"""
