// Python callables as an engine: segment name -> callable(*inputs) -> output or tuple of outputs.
// Inputs are zero-copy DLPack views of the runtime's buffers; outputs are any objects with
// __dlpack__ (torch tensors, numpy arrays, ...) and are copied into the runtime's buffers.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "engine.hpp"
#include "manifest.hpp"
#include "ops.hpp"

namespace adadiff {

// Registers the view type (adadiff_rt.BufferView) on the module.
void register_buffer_view(pybind11::module_& m);

std::unique_ptr<Engine> make_dlpack_engine(const Manifest& m, Ops* ops, const pybind11::dict& segments,
                                           int max_batch);

}  // namespace adadiff
