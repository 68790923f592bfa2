// The Python module's help texts (Runtime, denoise, sample): kept apart from the bindings so that
// module.cpp reads as code.
#pragma once

namespace adadiff::python {

inline constexpr const char* kRuntimeDoc = R"doc(
An engines folder loaded for inference.

Runtime(engines_dir, device="cpu", engine="auto", precision=None, threads=0, *, segments=None,
        cache_dir=None, device_id=0, fuse_static=True, fuse_exit=True, build_plans="auto",
        cuda_graphs=None)

engine: "auto" (OpenVINO on cpu, TensorRT on cuda, "dlpack" when segments is given), "openvino",
"tensorrt" or "dlpack" (segments = {segment name: callable(*DLPack inputs) -> outputs}).
precision: None (the engine's own: OpenVINO fp32, TensorRT its plans'), OpenVINO's "fp32" or "bf16",
or TensorRT's plans' own; threads: OpenVINO CPU threads (0 = its default). An option the engine
cannot honour (another precision than the plans', threads on TensorRT or DLPack, precision on
DLPack) is refused with ValueError, not ignored. cache_dir: OpenVINO's compiled-model cache and
TensorRT's plan cache (default <engines_dir>/openvino_cache or /tensorrt_cache when writable, else
for TensorRT ~/.cache/adadiff/tensorrt; "" disables them). build_plans (TensorRT): "auto" builds
plans from the folder's ONNX segments into the plan cache, once per machine, when the folder has
none or they were built by another TensorRT version or for another GPU; "never" refuses such a
folder. cuda_graphs (TensorRT): None or True replays each plan as a CUDA graph after one plain run
per batch and buffer set; False enqueues every call; True with another engine is refused. fuse_static: OpenVINO runs the
static policy's stem, layers 1..L and head as one compiled graph (stitched from the segments; the
same results, without a call per segment); False chains the segments as the other policies do.
fuse_exit: OpenVINO runs the uem policy as one compiled graph that tests u after every layer itself
and skips the layers left once every row has exited (whole-batch exit at any batch, per-row exit
for up to 2 rows, where it saves the per-segment calls that compaction cannot); False always
chains the segments.
Every file is checked against its sha256 in manifest.json before use.
)doc";

inline constexpr const char* kDenoiseDoc = R"doc(One early-exit denoiser call: x float32 [B,C,H,W], t float32 [B] (continuous time), y int64 [B].

Arrays: numpy, any CPU DLPack object (torch CPU tensors, no copy) or, on a device='cuda' Runtime,
CUDA memory (DLPack or __cuda_array_interface__), all on one device; the results come back as the
input's kind on its device (torch in, torch out; numpy otherwise; CUDA: adadiff_rt.DeviceArray or the
input library's tensor). stream (CUDA: a torch/CuPy stream or a cudaStream_t int): the runtime's work
is ordered after the stream's and the stream's later work after it, and the call does not wait;
without it a CUDA call waits for its results.

Returns (eps float32 [B,C,H,W], exit_layer int64 [B] (1-based), u float32 [B,N] with NaN where not
computed). policy "uem" (the paper's rule: exit when u < threshold) | "uem-time" (thresholds and a
layer range by time) | "schedule" (an exit layer by time) | "static" (static_layer) | "saturation" |
"uem-authors" (the AdaDiff code's rule: one decision for the batch on mean u < threshold = 1 - tau,
in blocks at the second trigger, from the mid block on at the first; granularity "batch", patience 1);
granularity "sample" (exited samples leave the batch) or "batch" (one decision for the batch);
table: a schedule {t_bounds, layers} or uem-time table {t_bounds, min_layers, max_layers,
thresholds} as in the manifest. Every argument left None takes the manifest's exit defaults
(Runtime.default_exit).)doc";

inline constexpr const char* kSampleDoc = R"doc(The whole sampling loop in C++ (mirrors adadiff_export.sampling.samplers).

Arrays and stream as for denoise; layers_used is a host array (numpy, or torch for torch inputs).

sampler "dpm++" | "ddim" | "euler"; steps None = 50 | 100 | 1000; guidance None = the manifest's
default (classifier-free guidance, one batched call: cond half first, then the null class);
the exit arguments as for denoise (None: the manifest's defaults); final_x0 (default): the last step returns
its x0 prediction instead of stepping to t_eps (False: x at t_eps, the paper's samplers).
Returns (images float32 [B,C,H,W] in [-1, 1], layers_used int64 [steps, B_eff]), B_eff = 2B
under guidance. Stochastic samplers (ddim with eta > 0, euler) use the runtime's own RNG (seed).)doc";

}  // namespace adadiff::python
