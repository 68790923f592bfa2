// Whole forwards stitched from the segments' own ov::Models, so the manifest stays the only
// contract (no extra ONNX file): the static policy's path, and the uem exit loop with its tests
// inside the graph. Internal to the OpenVINO engine (openvino_engine.cpp compiles what these build).
#pragma once

#ifdef ADADIFF_WITH_OPENVINO
#include <openvino/core/model.hpp>

#include <memory>
#include <vector>

#include "engine.hpp"
#include "manifest.hpp"

namespace adadiff {

// The segments' models by manifest index (stem, layer_1..layer_N, head; `full` may be null).
using SegmentModels = std::vector<std::shared_ptr<ov::Model>>;

// stem -> layer_1..layer_`layers` -> head as one model: the stem's inputs, output "eps". Each
// layer's `u` output is left out, so OpenVINO drops its UEM as dead code; what remains computes
// exactly what the chain does.
std::shared_ptr<ov::Model> stitch_static(const Manifest& m, const SegmentModels& segs, int layers);

// The `uem` exit loop as one model for one batch size: the stem, layer 1, then each later layer
// inside an If that runs it unless every row has exited and otherwise passes h through with
// u = -inf, then the head. The exit test is the chained loop's (decide_exits): u < threshold per
// row, or the batch mean of u for whole-batch exit, counted over `patience` consecutive layers; no
// test after the last layer. The test sits in the enclosing graph, on the If's outputs (h and u
// only): the -inf of a skipped layer is below any threshold, which keeps an exit sticky without a
// flag carried through the Ifs. Rows that exit while others run are frozen by a Select.
// Inputs: the stem's, then "thr" (per-layer thresholds, [N-1] or [N-1, B] for per-row exit, so one
// compile serves every threshold and time table). Outputs: "eps", and "u" with -inf where a row did
// not run a layer, laid out layer by layer (u of layer i for row r at flat index i * B + r).
std::shared_ptr<ov::Model> stitch_exit(const Manifest& m, const SegmentModels& segs, const ExitGraphSpec& spec,
                                       int batch);

}  // namespace adadiff
#endif
