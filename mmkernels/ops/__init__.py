"""One sub-package per operator: reference, kernels, launcher, autograd function, module."""
