"""Static resource report of the Triton kernels: compile without a GPU, read the machine code.

Each variant (kernel family, K, data dtype) is compiled for an NVIDIA target with
``triton.compile(ASTSource, GPUTarget)`` in a child process (so one compile can be cut off by a
timeout), with Triton's cache bypassed so the compile time is real (CPU seconds of Triton and
ptxas). ptxas's ``-v`` log gives the
registers per thread and the bytes of spill stores; ``cuobjdump -res-usage`` (shipped with triton)
gives the static shared memory, to which Triton's dynamic shared memory is added.

Theoretical occupancy: a block of w warps with r registers per thread and
s bytes of shared memory runs

    blocks/SM = min(⌊W_max / w⌋, B_max, ⌊⌊R_SM / (⌈32 r / 256⌉·256)⌋ / w⌋, ⌊S_SM / (s + 1 KiB)⌋),

occupancy = blocks/SM · w / W_max (W_max = 64 warps, B_max = 32 blocks, R_SM = 65,536 registers;
S_SM = 164 KiB on sm_80, 228 KiB on sm_90, 1 KiB reserved per block).

The roofline on paper gives, per kernel at a problem size, the bytes one launch must move
and the flops it performs; the time a GPU needs is at least max(bytes / bandwidth, flops / peak).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KS = tuple(range(1, 9))
DATA_DTYPES = ("fp32", "bf16", "fp16", "fp64")
FAMILIES = ("transition", "perturb_fwd", "perturb_bwd", "dsm_fwd", "dsm_bwd", "hutchinson",
            "sde_step")
ROW_KEYS = ("kernel", "K", "dtype", "arch", "registers", "spill_bytes", "shared_bytes",
            "compile_seconds", "occupancy")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}

# Targets: compile time, and spill bytes allowed up to K = 4 and for K = 5..8.
MAX_COMPILE_SECONDS = 30.0
MAX_SPILL_SMALL_K = 0
MAX_SPILL_LARGE_K = 64


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of one NVIDIA architecture (CUDA occupancy calculator's values)."""

    name: str
    capability: int
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_shared_per_block: int = 1024
    register_unit: int = 256  # registers are allocated per warp in units of 256


ARCHS = {
    "sm80": Arch("sm80", 80, 164 * 1024),
    "sm90": Arch("sm90", 90, 228 * 1024),
}


def occupancy(arch: Arch, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Fraction of the SM's warp slots a kernel can fill (module docstring)."""
    per_warp = -(-32 * max(registers, 1) // arch.register_unit) * arch.register_unit
    blocks = min(arch.max_warps // num_warps, arch.max_blocks,
                 (arch.registers_per_sm // per_warp) // num_warps,
                 arch.shared_per_sm // (shared_bytes + arch.reserved_shared_per_block))
    return blocks * num_warps / arch.max_warps


# -- variants -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One compiled specialisation: the kernel family, K and the data dtype it is launched with."""

    kernel: str
    K: int
    dtype: str


def launched_ks(kernel: str) -> tuple[int, ...]:
    """The K the package launches ``kernel`` with (the transition: up to its register limit)."""
    if kernel == "transition":
        from fastmdm.kernels.common import TRANSITION_MAX_K

        return tuple(k for k in KS if k <= TRANSITION_MAX_K)
    return KS


def variants(ks=KS, dtypes=DATA_DTYPES, kernels=FAMILIES) -> list[Variant]:
    """Every variant the package launches among ``ks`` × ``dtypes`` (the transition is float64)."""
    out = []
    for kernel in kernels:
        for K in ks:
            if K not in launched_ks(kernel):
                continue
            for dtype in ("fp64",) if kernel == "transition" else dtypes:
                out.append(Variant(kernel, K, dtype))
    return out


def _source(v: Variant):
    """(jit function, signature, constexprs, num_warps) as the launcher specialises it, with the
    heaviest flags (full start, noise from the seed, every gradient, three inputs)."""
    from fastmdm.kernels import dsm_loss, hutchinson, perturbation, sampler_step, transition
    from fastmdm.kernels.common import num_warps
    from fastmdm.transition import LYAPUNOV_TERMS, TAYLOR_TERMS

    data = "*" + v.dtype
    acc = "*fp64" if v.dtype == "fp64" else "*fp32"

    def ptrs(names, kind):
        return {n: kind for n in names.split()}

    def ints(names, kind="i32"):
        return {n: kind for n in names.split()}

    seeded = ints("seed offset", "i64")
    if v.kernel == "transition":
        sig = {**ptrs("a_ptr two_d_ptr var_ptr tau_ptr norm_ptr aux_std_ptr m_ptr cov_ptr chol_ptr "
                      "inv_t_ptr", "*fp64"), "B": "i32"}
        return (transition._transition_kernel, sig,
                dict(K=v.K, HYBRID=v.K > 1, TAYLOR=TAYLOR_TERMS, LYAPUNOV=LYAPUNOV_TERMS,
                     BLOCK_B=transition.BLOCK_B), 1)
    if v.kernel == "perturb_fwd":
        sig = {"x_ptr": data, **ptrs("coef_ptr chol_ptr noise_ptr", acc), **ptrs("out_ptr eps_out_ptr",
               data), **seeded, **ints("d sxb sxk sxj snb snk snj")}
        return (perturbation._perturb_fwd, sig,
                dict(K=v.K, FULL=True, FROM_SEED=True, WRITE_NOISE=True, BLOCK_D=1024),
                num_warps(v.K, v.dtype == "fp64"))
    if v.kernel == "perturb_bwd":
        sig = {**ptrs("g_ptr x_ptr", data), **ptrs("coef_ptr noise_ptr", acc), "gx_ptr": data,
               **ptrs("gcoef_ptr gchol_ptr", acc), **seeded,
               **ints("d sgb sgk sgj sxb sxk sxj snb snk snj")}
        return (perturbation._perturb_bwd, sig,
                dict(K=v.K, FULL=True, FROM_SEED=True, NEED_X=True, NEED_COEF=True,
                     NEED_CHOL=True, BLOCK_D=1024), num_warps(v.K, v.dtype == "fp64"))
    strides = ints("d seb sek sej snb snk snj")
    if v.kernel == "dsm_fwd":
        sig = {"eh_ptr": data, **ptrs("noise_ptr w_ptr part_ptr", acc), **seeded, **strides}
        return (dsm_loss._dsm_fwd, sig, dict(K=v.K, FROM_SEED=True, BLOCK_D=1024),
                num_warps(v.K, v.dtype == "fp64"))
    if v.kernel == "dsm_bwd":
        sig = {"eh_ptr": data, **ptrs("noise_ptr w_ptr go_ptr", acc), "geh_ptr": data,
               "gw_ptr": acc, **seeded, **strides}
        return (dsm_loss._dsm_bwd, sig,
                dict(K=v.K, FROM_SEED=True, NEED_EPS_HAT=True, NEED_W=True, BLOCK_D=1024),
                num_warps(v.K, v.dtype == "fp64"))
    if v.kernel == "hutchinson":
        sig = {"w_ptr": data, "mix_ptr": "*fp64", "partial_ptr": "*fp64", "seed": "i32",
               "offset": "i64", **ints("B d n_chunks")}
        return (hutchinson._quadratic_forms_kernel, sig,
                dict(KV=v.K, KW=v.K, GAUSSIAN=True, BLOCK_D=1024), num_warps(v.K, fp64=True))
    if v.kernel == "sde_step":
        sig = {**ptrs("u_ptr y0_ptr y1_ptr y2_ptr", data), "coef_ptr": acc, "seeds_ptr": "*i64",
               "out_ptr": data, **ints("index d")}
        return (sampler_step._sde_step_kernel, sig,
                dict(K=v.K, INPUTS=3, NOISY=True, BLOCK_D=1024),
                num_warps(v.K, v.dtype == "fp64"))
    raise ValueError(f"kernel must be one of {FAMILIES}, got {v.kernel!r}")


# -- compile and read resources ------------------------------------------------------------
_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_bytes": re.compile(r"(\d+) bytes spill stores"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def cuobjdump() -> str | None:
    """Path of the cuobjdump that ships with triton (None if absent)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's kernel from ``cuobjdump -res-usage``."""
    tool = cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ptxas)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _compile(v: Variant, arch: Arch, num_warps: int | None = None) -> dict:
    """Compile one variant here (no cache) and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, constexprs, warps = _source(v)
    warps = num_warps or warps
    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    start, cpu = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch.capability, 32),
                                  options={"num_warps": warps})
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    found = {k: int(m.group(1)) if (m := rx.search(log.getvalue())) else 0
             for k, rx in _PTXAS.items()}
    res = resource_usage(compiled.asm["cubin"])
    registers = res.get("REG", found["registers"])
    shared = res.get("SHARED", 0) + int(compiled.metadata.shared)
    return {"kernel": v.kernel, "K": v.K, "dtype": v.dtype, "arch": arch.name,
            "registers": registers, "spill_bytes": found["spill_bytes"], "shared_bytes": shared,
            "compile_seconds": round(cpu, 2), "wall_seconds": round(seconds, 2),
            "occupancy": round(occupancy(arch, registers, shared, warps), 4),
            "num_warps": warps, "stack_bytes": res.get("STACK", found["stack_bytes"])}


def _child(conn, v: Variant, arch: Arch, num_warps: int | None) -> None:
    try:
        conn.send(_compile(v, arch, num_warps))
    except Exception as e:  # the parent records it as a failed row
        conn.send({"error": f"{type(e).__name__}: {str(e).strip().split(chr(10))[0][:200]}"})


def compile_variant(v: Variant, arch: str, timeout_s: float = 120.0,
                    num_warps: int | None = None) -> dict:
    """Compile ``v`` for ``arch`` ("sm80" or "sm90") in a child process cut off after ``timeout_s``
    (with ``num_warps`` instead of the launcher's, to try another launch configuration).

    Returns a row with ``ROW_KEYS`` (compile_seconds: CPU seconds of Triton and ptxas, which a
    loaded machine inflates less than wall-clock), plus num_warps, stack_bytes, wall_seconds, and
    ``error`` when the compile failed or timed out: then the resources are None and
    compile_seconds is the wall-clock time spent.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    env_interp = os.environ.pop("TRITON_INTERPRET", None)  # a real compile, not the interpreter
    # a fork shares the imported kernels, unless they were imported as interpreted functions
    ctx = multiprocessing.get_context("spawn" if env_interp not in (None, "", "0") else "fork")
    parent, child = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(child, v, ARCHS[arch], num_warps), daemon=True)
    proc.start()
    try:
        got = parent.recv() if parent.poll(timeout_s) else None
    except EOFError:
        got = {"error": f"compiler process exited with code {proc.exitcode}"}
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
        if proc.is_alive():
            proc.kill()
        proc.join()
    if got is None:
        got = {"error": f"timeout after {timeout_s:g} s"}
    if "error" in got:
        return {"kernel": v.kernel, "K": v.K, "dtype": v.dtype, "arch": arch, "registers": None,
                "spill_bytes": None, "shared_bytes": None,
                "compile_seconds": round(time.perf_counter() - start, 2), "occupancy": None,
                "error": got["error"]}
    return got


def violations(rows: list[dict]) -> list[str]:
    """The rows that miss a target: compile ≤ 30 s, no spill for K ≤ 4, ≤ 64 B for K = 5..8."""
    bad = []
    for r in rows:
        name = f"{r['kernel']} K={r['K']} {r['dtype']} {r['arch']}"
        if r.get("error") or r.get("spill_bytes") is None:
            bad.append(f"{name}: {r.get('error', 'not compiled')}")
            continue
        if r["compile_seconds"] > MAX_COMPILE_SECONDS:
            bad.append(f"{name}: compiled in {r['compile_seconds']} s > {MAX_COMPILE_SECONDS:g} s")
        limit = MAX_SPILL_SMALL_K if r["K"] <= 4 else MAX_SPILL_LARGE_K
        if r["spill_bytes"] > limit:
            bad.append(f"{name}: spills {r['spill_bytes']} B > {limit} B")
    return bad


# -- roofline on paper ---------------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    """Datasheet peaks (SXM parts): HBM bandwidth, non-tensor-core fp32 and fp64 rates."""

    name: str
    bandwidth: float  # bytes/s
    fp32: float  # flop/s
    fp64: float


GPUS = (Gpu("H100 SXM", 3.35e12, 67e12, 34e12), Gpu("H200 SXM", 4.8e12, 67e12, 34e12))
COPY_TARGET = 0.7  # memory-bound kernels: at least 70 % of copy bandwidth


def traffic(kernel: str, K: int, B: int = 512, d: int = 3072, dtype: str = "fp32"
            ) -> tuple[float, float, bool]:
    """(bytes moved, flops, flops in fp64?) of one launch at (B, K, d), in the variant the training
    step and the sampler launch: hybrid start, noise from the seed and not stored, one probe,
    one network input. Philox draws count 0 flops (integer work)."""
    s, n = BYTES[dtype], B * d
    if kernel == "transition":
        taylor, lyapunov = 20, 26
        flops = B * (2 * K**3 * (taylor + lyapunov) + 10 * K**3)
        return 4 * B * K * K * 8, flops, True
    if kernel == "perturb_fwd":  # read x0, write u_t
        return n * s * (1 + K), n * 2 * (K + K * (K + 1) / 2), s == 8
    if kernel == "perturb_bwd":  # read g and x0, write g_x0; partial sums of g x0ᵀ, g εᵀ
        return n * s * (K + 2), n * 2 * (K + K + K * K), s == 8
    if kernel == "dsm_fwd":  # read ε̂
        return n * s * K, n * (2 * K * K + 2 * K), s == 8
    if kernel == "dsm_bwd":  # read ε̂, write its gradient; W's gradient
        return n * s * 2 * K, n * (2 * K * K + 4 * K * K), s == 8
    if kernel == "hutchinson":  # read w (one probe); float64 products
        return n * s * K, n * 2 * K * K, True
    if kernel == "sde_step":  # read u and y0, write u
        return n * s * 3 * K, n * 2 * 3 * K * K, s == 8
    raise ValueError(f"kernel must be one of {FAMILIES}, got {kernel!r}")


def roofline(kernel: str, K: int, gpu: Gpu, **size) -> dict:
    """Lower bounds on time (µs) from bandwidth and from the flop rate, and the bound."""
    nbytes, flops, fp64 = traffic(kernel, K, **size)
    t_mem = nbytes / gpu.bandwidth * 1e6
    t_flop = flops / (gpu.fp64 if fp64 else gpu.fp32) * 1e6
    return {"bytes": nbytes, "flops": flops, "memory_us": t_mem, "compute_us": t_flop,
            "bound": "memory" if t_mem >= t_flop else "compute",
            "target_us": max(t_mem / COPY_TARGET, t_flop)}
