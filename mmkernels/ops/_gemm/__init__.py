"""The shared GEMM core of the operators: one persistent row GEMM (gather, TMA, epilogues) and one
row-reduction GEMM (weight gradients), with one table of paths and block sizes per GPU generation.

* :mod:`.kernels` -- the Triton kernels and the device helpers the operators share (tile schedule,
  swizzle, activations, seeded dropout);
* :mod:`.config` -- each GEMM role's path (the Triton core or ``torch._grouped_mm``), block sizes and
  where they come from, per GPU generation, interpreter included;
* :mod:`.launch` -- host launchers (tensor descriptors, the persistent grid) and the
  ``torch._grouped_mm`` helpers.

Used by the MoE layer (forward, dZ, dX, weight gradients, ``grouped_gemm``) and PLoRA (forward, dX).
See ``docs/gemm.md``.
"""
