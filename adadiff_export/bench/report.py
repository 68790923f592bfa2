"""The bench's output: one markdown table per (model, workload), the JSON rows, and the issue's goals checked."""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .harness import Row, machine_line


COLUMNS = ("batch", "engine", "policy", "gran.", "thr.", "ms", "speedup", "layers", "ideal", "eff.", "FD", "acc.",
           "pred. mse", "note")


def _fmt(v: Optional[float], spec: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec)


def _cells_of(r: Row) -> List[str]:
    pol = f"static L{r.static_layer}" if r.policy == "static" else r.policy
    thr = _fmt(r.threshold, ".4g") if r.policy in ("uem", "saturation") else "-"
    star = " **(default)**" if r.default else ""
    return [str(r.batch), r.engine, pol + star, r.granularity, thr, _fmt(r.ms, ".1f"), _fmt(r.speedup, ".2f") + "x",
            _fmt(r.mean_layers, ".2f"), _fmt(r.ideal_speedup, ".2f") + "x", _fmt(r.efficiency, ".2f"),
            _fmt(r.fd, ".2f"), _fmt(r.accuracy * 100 if np.isfinite(r.accuracy) else r.accuracy, ".1f"),
            _fmt(r.pred_mse, ".2e"), r.note]


def markdown(rows: Sequence[Row], info: Dict[str, object], command: str) -> str:
    """One markdown table per (model, workload), with the machine and the command on top."""
    out = [f"Machine: {machine_line(info)}", "", f"Command: `{command}`", ""]
    groups: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.workload), []).append(r)
    for (model, workload), rs in groups.items():
        what = "one denoiser call" if workload == "denoise" else "one whole 50-step DPM-Solver++ run with guidance"
        out += [f"### {model}: {workload} ({what})", "", "| " + " | ".join(COLUMNS) + " |",
                "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(_cells_of(r)) + " |" for r in rs]
        out.append("")
    return "\n".join(out)


# Issue 18, for the default policy on a whole 50-step run: speedup over the fastest full-depth peer (per batch),
# FD at most 10% above full depth.
GOALS = {"speedup": {1: 2.0, 64: 1.9}, "efficiency": 0.9, "fd_ratio": 1.10}


def goals(rows: Sequence[Row], batches: Sequence[int] = (1, 64)) -> List[str]:
    """The issue's goals checked on the measured rows: whole sampling run, the default policy, granularity sample."""
    lines = []
    full_fd = next((r.fd for r in rows if r.model == "small" and r.policy == "full" and np.isfinite(r.fd)), float("nan"))
    for b in batches:
        r = next((r for r in rows if r.model == "small" and r.workload == "sample" and r.batch == b
                  and r.engine == "adadiff_rt" and r.default and r.granularity == "sample"), None)
        if r is None:
            lines.append(f"batch {b}: not measured in this run")
            continue
        ratio = r.fd / full_fd if np.isfinite(full_fd) and full_fd > 0 else float("nan")
        want = GOALS["speedup"].get(b, min(GOALS["speedup"].values()))
        checks = [("speedup", r.speedup, r.speedup >= want, f">= {want}x"),
                  ("efficiency", r.efficiency, r.efficiency >= GOALS["efficiency"], f">= {GOALS['efficiency']}"),
                  ("FD / full-depth FD", ratio, ratio <= GOALS["fd_ratio"], f"<= {GOALS['fd_ratio']}")]
        parts = [f"{name} {_fmt(v, '.3f')} ({'met' if ok else 'NOT met'}, goal {goal})" for name, v, ok, goal in checks]
        setting = f"threshold {r.threshold:g}" if r.threshold is not None else r.policy
        lines.append(f"batch {b}, {setting}, {r.mean_layers:.2f} layers: " + "; ".join(parts))
    return lines


def to_json(rows: Sequence[Row], info: Dict[str, object]) -> List[Dict[str, object]]:
    """The JSON list of rows (NaN becomes null), each naming the machine."""
    def clean(v):
        return None if isinstance(v, float) and not np.isfinite(v) else v

    return [{**{k: clean(v) for k, v in asdict(r).items()}, "machine": info["cpu"], "cores": info["logical_cpus"]}
            for r in rows]
