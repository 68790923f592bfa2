"""What one model instance does with the requests Triton's dynamic batcher hands it together.

Each request is checked on its own (`protocol.parse_*`); a bad one gets its own `RequestError` and the others go
on. The good rows are grouped by their parameters (steps, guidance, exit choice): rows with equal parameters run
as one `Runtime` call, whichever requests they came from, and rows with different parameters never share a call.
Every row exits at its own layer (granularity `sample`), so a row's image and layers are those `Runtime.sample`
gives for it alone, whatever shares its batch (tests/test_serve.py checks this). A handler result is, per request,
either a dict of output arrays or the RequestError to answer it with.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .protocol import ModelFacts, RequestError, parse_denoise, parse_sample

Result = Union[Dict[str, np.ndarray], RequestError]
Rows = List[Tuple[int, int]]  # (request index, row index) of each row in a group, in order


def mean_layers(layers_used: np.ndarray, batch: int) -> np.ndarray:
    """Per sample, the mean layers over all steps, counting both halves of classifier-free guidance (the
    conditional row i and its null-class twin batch + i) as the `sample` command's mean does: [batch] float32."""
    used = np.asarray(layers_used, dtype=np.float64)
    per_col = used.mean(axis=0)
    if per_col.shape[0] == 2 * batch:
        per_col = (per_col[:batch] + per_col[batch:]) / 2
    return per_col.astype(np.float32)


class _Handler:
    """Shared by both models: parse every request, group good rows by key, run each group, scatter back."""

    inputs: Tuple[str, ...]   # the arrays gathered into a group's call, in the order `_run` takes them

    def __init__(self, runtime, facts: Optional[ModelFacts] = None) -> None:
        self.rt = runtime
        self.facts = facts or ModelFacts.of(runtime)

    def __call__(self, requests: Sequence[Mapping[str, np.ndarray]]) -> List[Result]:
        results: List[Result] = [None] * len(requests)
        parsed = {}
        groups: Dict[Hashable, Rows] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                p = self._parse(request)
            except RequestError as e:
                results[i] = e
                continue
            parsed[i] = p
            for row, key in enumerate(self._keys(p)):
                groups[key].append((i, row))
        outputs: Dict[int, Dict[str, np.ndarray]] = {i: self._empty(p) for i, p in parsed.items()}
        for key, rows in groups.items():
            for start in range(0, len(rows), self.facts.max_batch):
                self._run_group(key, rows[start:start + self.facts.max_batch], parsed, outputs, results)
        for i, out in outputs.items():
            if results[i] is None:
                results[i] = out
        return results

    def _run_group(self, key, rows: Rows, parsed, outputs, results: List[Result]) -> None:
        gathered = {name: _gather(parsed, rows, name) for name in self.inputs}
        try:
            produced = self._run(key, **gathered)
        except ValueError as e:  # the runtime refused what the checks let through: answer its requests, not others
            for i in {i for i, _ in rows}:
                results[i] = RequestError(self.inputs[0], f"the runtime refused this request's group: {e}")
            return  # (a RuntimeError is the server's fault, not the request's: it fails the batch, as a 500)
        for k, (i, row) in enumerate(rows):
            for name, values in produced.items():
                outputs[i][name][row] = values[k]

    # subclasses: _parse(request) -> parsed, _keys(parsed) -> one group key per row, _empty(parsed) -> outputs
    # to fill, _run(key, **gathered) -> {output name: [rows, ...]}


def _gather(parsed, rows: Rows, name: str):
    column = [getattr(parsed[i], name) for i, _ in rows]
    if column[0] is None:
        return None
    return np.ascontiguousarray(np.stack([c[row] for c, (_, row) in zip(column, rows)]))


class SampleHandler(_Handler):
    """`adadiff_sample`: whole sampling runs (DPM-Solver++), one per group of rows with equal parameters."""

    inputs = ("noise", "label")

    def _parse(self, request):
        return parse_sample(request, self.facts)

    def _keys(self, p):
        return p.params

    def _empty(self, p):
        b = p.noise.shape[0]
        return {"image": np.empty_like(p.noise), "layers": np.empty((b, 1), np.float32)}

    def _run(self, params, noise, label):
        images, layers_used = self.rt.sample(noise, label, **params.runtime_kwargs())
        return {"image": images, "layers": mean_layers(layers_used, noise.shape[0])[:, None]}


class DenoiseHandler(_Handler):
    """`adadiff_denoise`: one early-exit denoiser call per group of rows with the same exit choice."""

    inputs = ("x", "t", "label")

    def _parse(self, request):
        return parse_denoise(request, self.facts)

    def _keys(self, p):
        return p.exits

    def _empty(self, p):
        b = p.x.shape[0]
        return {"eps": np.empty_like(p.x), "exit_layer": np.empty((b, 1), np.int64)}

    def _run(self, exit_choice, x, t, label):
        eps, exit_layer, _u = self.rt.denoise(x, t, label, **exit_choice.runtime_kwargs())
        return {"eps": eps, "exit_layer": exit_layer[:, None]}

