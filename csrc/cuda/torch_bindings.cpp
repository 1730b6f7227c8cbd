// CUDA registrations of the mmkernels operators (schemas: csrc/torch_bindings.cpp).
//
// Built into _C_cuda, which mmkernels/_extension.py loads after _C, and only into a torch with the
// CUDA major version this library was compiled with.
#include <torch/csrc/stable/library.h>

#include "ops.h"

STABLE_TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("plora_tile_flags", TORCH_BOX(&mmkernels::plora_tile_flags_cuda));
  m.impl("moe_route", TORCH_BOX(&mmkernels::moe_route_cuda));
}
