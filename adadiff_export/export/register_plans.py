"""`register-plans`: add TensorRT plans built outside `build` (by the folder's `trtexec.sh`) to its manifest.

A plan is trusted only after the checks adadiff_rt runs when it loads one: each `<segment>.plan` is
deserialized with the `tensorrt` package (the version that will run it), its I/O tensors and
optimization profile are read, and `adadiff_rt.check_plan` (the runtime's own C++ check) compares
them with the manifest. The manifest then records the plans' sha256, the TensorRT version, the GPU's
compute capability, the precision and the profile. Without TensorRT and a GPU nothing can be checked,
and the command refuses rather than registering files it could not read.

Written against the TensorRT 10 Python API documentation (Runtime.deserialize_cuda_engine,
ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype / get_tensor_shape /
get_tensor_profile_shape); the path past the TensorRT import has NOT run in CI (no TensorRT, no GPU).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, Optional

from ..errors import UserError
from . import manifest as mf
from .tensorrt_build import TRTEXEC_SCRIPT, probe

DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64"}


class RegisterError(UserError, RuntimeError):
    """The plans cannot be registered; the manifest was left as it was."""


def _plan_files(folder: Path, m: mf.Manifest) -> Dict[str, Path]:
    """segment name -> its plan; every segment but `full` (optional, as for the runtime) must have one."""
    plans = {s.name: folder / f"{s.name}.plan" for s in m.segments if (folder / f"{s.name}.plan").is_file()}
    if not plans:
        raise RegisterError(f"{folder} holds no <segment>.plan files: build them first (cd {folder} && sh {TRTEXEC_SCRIPT})")
    missing = [s.name for s in m.segments if s.kind != "full" and s.name not in plans]
    if missing:
        raise RegisterError(f"{folder}: no plan for segment(s) {', '.join(missing)} (expected {missing[0]}.plan, ...)")
    return plans


def _script_precision(folder: Path) -> Optional[str]:
    """The precision trtexec.sh was written for (its header line), if it is there."""
    script = folder / TRTEXEC_SCRIPT
    if script.is_file():
        found = re.search(r"^# precision (\w+),", script.read_text(), re.M)
        if found:
            return found.group(1)
    return None


def _plan_info(trt, engine) -> dict:
    """A deserialized plan's I/O in the form adadiff_rt.check_plan reads."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = engine.get_tensor_dtype(name)
        t = {"name": name, "input": is_input, "dtype": DTYPE_NAMES.get(dtype.name, dtype.name.lower()),
             "shape": list(engine.get_tensor_shape(name))}
        if is_input and engine.num_optimization_profiles > 0:
            t["min"], t["opt"], t["max"] = (list(s) for s in engine.get_tensor_profile_shape(name, 0))
        tensors.append(t)
    return {"profiles": engine.num_optimization_profiles, "tensors": tensors}


def register_plans(folder: Path, precision: Optional[str] = None,
                   log: Callable[[str], None] = print) -> mf.TensorRTInfo:
    """Check every `<segment>.plan` in `folder` against its manifest and record them in it."""
    folder = Path(folder)
    m = mf.load(folder)
    plans = _plan_files(folder, m)
    precision = precision or _script_precision(folder)
    if precision not in mf.PRECISIONS:
        raise RegisterError(f"the plans' precision is unknown: pass --precision ({', '.join(mf.PRECISIONS)}), "
                            f"the one trtexec built them in")
    here = probe()
    if not here.available:
        raise RegisterError(f"cannot check {len(plans)} plan(s) in {folder} ({', '.join(p.name for p in plans.values())}): "
                            f"{here.reason}. Plans are registered only after TensorRT has read them on the GPU "
                            "they will run on")
    import tensorrt as trt
    import adadiff_rt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    profile = None
    for name, path in plans.items():
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RegisterError(f"{path.name} is not a plan TensorRT {here.version} can load on this GPU "
                                f"({here.gpu_arch}): rebuild it with this TensorRT here (its errors are above)")
        info = _plan_info(trt, engine)
        if profile is None:  # the first plan's batch range; every other plan must have the same
            first = next((t for t in info["tensors"] if t["input"] and "min" in t), None)
            if first is None:
                raise RegisterError(f"{path.name} has no optimization profile (the batch is dynamic)")
            profile = {"min": first["min"][0], "opt": first["opt"][0], "max": first["max"][0]}
        trt_dict = {"version": here.version, "gpu_arch": here.gpu_arch, "precision": precision, "profile": profile}
        try:
            adadiff_rt.check_plan(str(folder), name, info, trt_dict)
        except RuntimeError as e:
            raise RegisterError(str(e)) from None
    if profile["max"] < 2 * m.max_batch:
        log(f"note: the plans' profile ends at batch {profile['max']}; guided sampling of {m.max_batch} samples "
            f"needs {2 * m.max_batch} rows, so adadiff_rt takes at most {profile['max'] // 2} guided samples per call")
    m.tensorrt = mf.TensorRTInfo(here.version, here.gpu_arch, precision, profile,
                                 {n: mf.PlanFile(p.name, mf.sha256_file(p)) for n, p in plans.items()})
    mf.write(m, folder)
    log(f"registered {len(plans)} TensorRT {precision} plans in {folder / mf.FILENAME} (TensorRT {here.version}, "
        f"{here.gpu_arch}, profile {profile['min']}/{profile['opt']}/{profile['max']})")
    return m.tensorrt
