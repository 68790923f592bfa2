"""The CUDA kernels are built for the architectures the module says (issue 17: one sm_90 image
failed on every other card with "no kernel image is available").

No GPU is needed: the test reads the fatbinary CUDA embeds in the module's ELF file (.nv_fatbin)
and compares its machine-code (SASS) and PTX entries with adadiff_rt.cuda_architectures, which CMake
wrote into the build. It skips where the module was built without CUDA.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from runtime_engines import import_runtime

adadiff_rt = import_runtime()

# CMakeLists.txt's default: Turing .. Blackwell machine code, PTX for the newest.
DEFAULT = "75-real,80-real,86-real,89-real,90-real,100-real,120"

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_SASS = 1, 2


def elf_section(path: Path, wanted: str) -> bytes:
    """The bytes of one section of a 64-bit little-endian ELF file (the module), or b""."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit little-endian ELF file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, str_off, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name:end].decode() == wanted:
            return data[offset:offset + size]
    return b""


def fatbin_entries(blob: bytes):
    """(kind, sm) of every entry of the fatbinaries in a .nv_fatbin section. Layout (as nvcc 12-13
    write it): a 16-byte header (magic, version, header size, payload size), then entries whose
    header starts with kind (u16: 1 PTX, 2 SASS), version (u16), header size (u32), payload size
    (u64), and carries the target's sm number at byte 28."""
    out, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:  # alignment padding between fatbinaries
            pos += 8
            continue
        p, end = pos + hsize, pos + hsize + fsize
        while p < end:
            kind, _v, ehsize, payload = struct.unpack_from("<HHIQ", blob, p)
            sm, = struct.unpack_from("<I", blob, p + 28)
            out.append((kind, sm))
            p += ehsize + payload
        pos = end
    return out


def expected(archs: str):
    sass = {int(a.split("-")[0]) for a in archs.split(",") if not a.endswith("-virtual")}
    ptx = {int(a.split("-")[0]) for a in archs.split(",") if "-" not in a or a.endswith("-virtual")}
    return sass, ptx


@pytest.mark.skipif(not adadiff_rt.has_cuda, reason="adadiff_rt was built without CUDA (no nvcc at build time)")
def test_module_embeds_the_architectures_it_reports():
    archs = adadiff_rt.cuda_architectures
    want_sass, want_ptx = expected(archs)
    entries = fatbin_entries(elf_section(Path(adadiff_rt.__file__), ".nv_fatbin"))
    assert entries, f"{adadiff_rt.__file__} has no CUDA fatbinary although it was built with CUDA"
    sass = {sm for kind, sm in entries if kind == KIND_SASS}
    ptx = {sm for kind, sm in entries if kind == KIND_PTX}
    assert (sass, ptx) == (want_sass, want_ptx), f"built for {archs}: SASS {sorted(sass)}, PTX {sorted(ptx)}"


@pytest.mark.skipif(not adadiff_rt.has_cuda, reason="adadiff_rt was built without CUDA (no nvcc at build time)")
def test_default_architectures_span_turing_to_blackwell():
    # A build that chose its own list (the environment variable or -D) is checked above only.
    override = os.environ.get("ADADIFF_CUDA_ARCHITECTURES")
    if override:
        pytest.skip(f"ADADIFF_CUDA_ARCHITECTURES={override} chose the list")
    assert adadiff_rt.cuda_architectures == DEFAULT
    sass, ptx = expected(DEFAULT)
    assert sass == {75, 80, 86, 89, 90, 100, 120} and ptx == {120}


def test_fatbin_parser_reads_entries():
    # A hand-made fatbinary with one SASS and one PTX entry: the parser itself, without nvcc.
    def entry(kind, sm, payload):
        head = struct.pack("<HHIQ", kind, 0x101, 64, len(payload)) + b"\0" * 12 + struct.pack("<I", sm)
        return head + b"\0" * (64 - len(head)) + payload
    body = entry(KIND_SASS, 86, b"x" * 24) + entry(KIND_PTX, 120, b"y" * 8)
    blob = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body
    assert fatbin_entries(b"\0" * 8 + blob) == [(KIND_SASS, 86), (KIND_PTX, 120)]
    assert expected("75-real,90,100-virtual") == ({75, 90}, {90, 100})


def _nvcc():
    import shutil
    found = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return found if Path(found).is_file() else None


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc here: the TensorRT sources compile with CUDA's headers")
def test_tensorrt_sources_compile_against_tensorrt_10_and_11(tmp_path):
    """The TensorRT engine (plans, CUDA graphs) and the plan builder cannot run here (no TensorRT, no
    GPU), but they must compile, warnings as errors, against the headers of both TensorRT lines a
    user meets (10.16.1 and 11.1.0, vendored in third_party/tensorrt): 11 dropped the fp16 / bf16
    builder flags, and a removed call would otherwise first fail on a user's GPU machine."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(root), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DADADIFF_CUDA=ON",
                 "-DADADIFF_OPENVINO=OFF", "-DADADIFF_TENSORRT=OFF", "-DADADIFF_PYTHON=OFF",
                 "-DADADIFF_CUDA_ARCHITECTURES=90", f"-DCMAKE_CUDA_COMPILER={_nvcc()}"]
    for cmd in (configure, ["cmake", "--build", str(build), "--target", "adadiff_tensorrt_check", "--parallel", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    objects = sorted(p.relative_to(build).as_posix() for p in build.rglob("tensorrt_*.cpp.o"))
    assert len(objects) == 4, objects  # engine and builder, once per header set
    assert {o.split("/")[1] for o in objects} == {"adadiff_tensorrt_check_1.dir", "adadiff_tensorrt_check_2.dir"}
