"""Serving adadiff_rt behind NVIDIA Triton Inference Server (through PyTriton), and a load test for it.

- `protocol`: the two served models' tensors (names, dtypes, shapes) and the checks every request passes, each
  failure naming the tensor and the rule (`RequestError`). numpy only: the server and the clients share it.
- `handlers`: what a model instance does with a dynamic batch of requests: validate each, group the rows by their
  parameters (steps, guidance, threshold), one `Runtime.sample` / `Runtime.denoise` call per group, and each
  request's rows back to it. numpy and adadiff_rt only, so tests call it without a server.
- `server`: the PyTriton binding (models, dynamic batcher, instances), per-request error responses, readiness,
  and the drain on SIGTERM.
- `interpreter`: which Python can host PyTriton (its backend stub must load this interpreter's own libpython)
  and the serving venv that `scripts/setup.sh` makes for it.
- `loadtest`: a closed-loop load generator with tritonclient: throughput, latency percentiles, mean layers and
  errors, at full depth and at the default exit policy side by side, and the latency-throughput figure.
"""
