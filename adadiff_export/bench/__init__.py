"""The benchmark, the paper's figures and the demo: on top of the exporter and the runtime, importing both.

`python -m adadiff_export bench` times every peer side by side, in one process, interleaved.

What is measured (all on this machine, medians of repeated runs after a warm-up, cases of one
(workload, batch) cell interleaved round-robin so that drifts of the machine hit every case alike):

- peers: PyTorch eager at full depth; the authors' style of early exit in PyTorch (one decision
  per batch, head and UEM evaluated at every layer); onnxruntime on `full`; OpenVINO (f32) on `full`;
- ours: adadiff_rt at threshold 0 (every layer: the cost of segmenting), a threshold sweep with
  granularity `sample` and `batch`, static exit at the matched layer budget, and saturation at the
  matched budget;
- workloads: one denoiser call (`denoise`) and one whole 50-step DPM-Solver++ run with
  classifier-free guidance (`sample`), at batch 1, 8 and 64;
- the U-ViT-S/2 CIFAR-10 shape with untrained weights (speed does not depend on the weights):
  `denoise` only, small batches, static exit at the shipped model's mean layer count.

Columns: time, speedup over the fastest full-depth peer of the same cell, mean layers, the ideal
speedup from the profiled per-segment costs, efficiency (achieved / ideal), FD and class accuracy
(from a separate sampling run of `--n` images per setting; FD in the shipped classifier's feature
space, not Inception FID) and the prediction error against full depth (mse of this case's output
to PyTorch full depth on the same inputs: eps for `denoise`, images for `sample`).

Modules: `config` (what a run measures), `harness` (machine line, interleaved timing, ideal speedup),
`contenders` (peers and adadiff_rt settings behind one interface), `quality` (FD, accuracy, matched budgets),
`report` (markdown, JSON, goals), `run` (the whole run), `figures` (the paper's figures), `demo`.
"""
