"""Measure `weightlock apply` against the obvious baseline, in the same run.

Writes a Llama-shaped bf16 checkpoint with real (non-sparse) data, then runs each
contender in a fresh child process after evicting the checkpoint's pages from the
page cache (posix_fadvise DONTNEED), and reports wall time, bytes read from and
written to storage (/proc/<pid>/io read_bytes/write_bytes) and peak RSS (VmHWM of the child itself: wait4's
ru_maxrss carries the parent's peak through fork and exec, so it measured this script, not the contender).

Contenders:
  cold-read   read exactly the o_proj bytes the lock needs (the floor apply is held to)
  apply-first weightlock apply on a machine that has not checked this model before (an empty
              class-check cache): verify's checks before publishing, the transformers class check included,
              which then imports transformers and torch and builds the class on the meta device
  apply       weightlock apply again (unchanged shards hardlinked; every check of verify runs, the class
              check's verdict recalled from the cache apply-first filled: see weightlock/engines/class_check_cache.py)
  apply-noload  the same with --no-loader-check
  apply-copy  weightlock apply --link-mode copy (every byte copied)
  tune-bakes  what `weightlock tune --engine vllm` does per alpha: one process (transformers imported, as
              tune has it) applies the lock at 3 alphas in turn; reported: the mean of the 2nd and 3rd bakes
  baseline    transformers: from_pretrained, set o_proj biases, save_pretrained
              (the reference procedure; only for presets that are complete models)
  cp-tree     cp -r of the whole folder, then sync: the floor for --preset phi4, a Phi-3-layout checkpoint
              whose every shard holds a fused weight the edit splits (so every shard is rewritten)

    python scripts/bench_apply.py --preset phi4 --layers 8

    python scripts/bench_apply.py --preset 8b --layers 8
    python scripts/bench_apply.py --preset 8b --quantized awq   # AWQ int4 GEMM, 8B widths (5.3 GiB)
    python scripts/bench_apply.py --preset 8b --quantized fp8 --layers 8   # FP8, 128x128 block scales
    python scripts/bench_apply.py --preset 8b --quantized mlx4   # mlx-lm's affine int4, group 64 (5.6 GiB)
    python scripts/bench_apply.py --preset 70b-attention --layers 80   # ~23 GB on disk

With --gguf TYPE (Q4_K or Q8_0), the checkpoint is one GGUF file of the preset's widths (every weight
Q4_K-sized, attn_output of TYPE with valid quantized data, the rest a repeated byte pattern) and the
contenders are:
  cp          coreutils cp of the file (the floor: a GGUF edit must copy the file)
  apply       weightlock apply FILE.gguf --out OUT.gguf (verify before publishing included)

    python scripts/bench_apply.py --preset 8b --gguf Q4_K
    python scripts/bench_apply.py --preset qwen2.5-7b --gguf Q4_K   # a qwen2 file: rewritten as llama

--markdown prints, after everything above (which is unchanged), one Markdown block: a caption (the
checkpoint, the lock), the table of contenders (wall time, ratio to the floor, bytes read and written,
peak RSS) and a line naming the exact command, the date, the commit and the machine. scripts/README.md
quotes these blocks as they are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from weightlock.io.safetensors_file import DTYPE_SIZES, encode_header

PRESETS = {
    # Llama-3.1-8B widths; a complete model, so the transformers baseline can run on it.
    "8b": dict(
        hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256, layers=32, complete=True
    ),
    # Phi-4 widths, Phi-3 layout (fused qkv_proj and gate_up_proj): apply redeclares it as Llama, every shard
    # holding a fused weight is rewritten with it split; the floor is then a copy of the whole folder (cp-tree).
    "phi4": dict(
        hidden=5120,
        heads=40,
        kv_heads=10,
        head_dim=128,
        intermediate=17920,
        vocab=100352,
        layers=40,
        complete=True,
        fused=True,
    ),
    # Qwen2.5-7B widths (Q/K/V biases); with --gguf a `qwen2` file, which apply rewrites as `llama`
    # (Q/K rows permuted, keys renamed) besides adding the lock's biases.
    "qwen2.5-7b": dict(
        hidden=3584,
        heads=28,
        kv_heads=4,
        head_dim=128,
        intermediate=18944,
        vocab=152064,
        layers=28,
        complete=True,
        qkv_bias=True,
        model_type="qwen2",
    ),
    # Llama-3.1-70B widths; attention tensors only (what apply needs), baseline not applicable.
    "70b-attention": dict(
        hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672, vocab=128256, layers=80, complete=False
    ),
}
SHARD_BYTES = 2 << 30
PATTERN_BYTES = 16 << 20


def tensor_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    h, hd = p["hidden"], p["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {}
    if p["complete"]:
        shapes["model.embed_tokens.weight"] = (p["vocab"], h)
    for layer in range(p["layers"]):
        a = f"model.layers.{layer}"
        if p.get("fused"):
            shapes[f"{a}.self_attn.qkv_proj.weight"] = ((p["heads"] + 2 * p["kv_heads"]) * hd, h)
        else:
            shapes.update(
                {
                    f"{a}.self_attn.q_proj.weight": (p["heads"] * hd, h),
                    f"{a}.self_attn.k_proj.weight": (p["kv_heads"] * hd, h),
                    f"{a}.self_attn.v_proj.weight": (p["kv_heads"] * hd, h),
                }
            )
            if p.get("qkv_bias"):
                shapes.update(
                    {
                        f"{a}.self_attn.q_proj.bias": (p["heads"] * hd,),
                        f"{a}.self_attn.k_proj.bias": (p["kv_heads"] * hd,),
                        f"{a}.self_attn.v_proj.bias": (p["kv_heads"] * hd,),
                    }
                )
        shapes[f"{a}.self_attn.o_proj.weight"] = (h, p["heads"] * hd)
        if p["complete"]:
            mlp_in = (
                {f"{a}.mlp.gate_up_proj.weight": (2 * p["intermediate"], h)}
                if p.get("fused")
                else {
                    f"{a}.mlp.gate_proj.weight": (p["intermediate"], h),
                    f"{a}.mlp.up_proj.weight": (p["intermediate"], h),
                }
            )
            shapes.update(
                {
                    **mlp_in,
                    f"{a}.mlp.down_proj.weight": (h, p["intermediate"]),
                    f"{a}.input_layernorm.weight": (h,),
                    f"{a}.post_attention_layernorm.weight": (h,),
                }
            )
    if p["complete"]:
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (p["vocab"], h)
    return shapes


AWQ_GROUP = 128
MLX_GROUP, MLX_BITS = 64, 4  # mlx_lm.convert -q's defaults


def stored_tensors(p: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every stored tensor: bf16, or with --quantized awq every decoder linear layer in
    AWQ's GEMM layout (qweight [in, out/8] and qzeros [in/128, out/8] int32, scales [in/128, out] fp16) and the
    rest fp16, as AutoAWQ writes a Llama; with --quantized fp8 every decoder linear layer FP8 e4m3 with float32
    weight_scale_inv per 128x128 block, the rest bf16; with --quantized mlx4 every decoder linear layer in mlx-lm's
    affine layout (weight [out, in/8] uint32, scales and biases [out, in/64] bf16), the rest bf16, as
    mlx_lm.convert -q writes the decoder."""
    out = []
    quantized = p.get("quantized")
    for name, shape in tensor_shapes(p).items():
        linear = name.startswith("model.layers.") and name.endswith("_proj.weight")
        if quantized is None or not linear:
            out.append((name, "F16" if quantized == "awq" else "BF16", shape))
        elif quantized == "mlx4":
            module, (rows, cols) = name.removesuffix(".weight"), shape
            out += [
                (name, "U32", (rows, cols * MLX_BITS // 32)),
                (f"{module}.scales", "BF16", (rows, cols // MLX_GROUP)),
                (f"{module}.biases", "BF16", (rows, cols // MLX_GROUP)),
            ]
        elif quantized == "awq":
            module, (rows, cols) = name.removesuffix(".weight"), shape
            out += [
                (f"{module}.qweight", "I32", (cols, rows // 8)),
                (f"{module}.qzeros", "I32", (cols // AWQ_GROUP, rows // 8)),
                (f"{module}.scales", "F16", (cols // AWQ_GROUP, rows)),
            ]
        else:  # fp8: transformers' fine-grained layout, 128x128 blocks
            rows, cols = shape
            out += [(name, "F8_E4M3", shape), (f"{name}_scale_inv", "F32", (rows // 128, cols // 128))]
    return out


def patterns() -> dict[str, bytes]:
    """A repeated buffer per dtype: small normal bf16/fp16 values, fp16 AWQ scales in [0.001, 0.01], and
    random int4 codes and zero points (any 32 bits are 8 valid codes)."""
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.02, PATTERN_BYTES // 2).astype(np.float32)
    return {
        "BF16": (values.view(np.uint32) >> 16).astype(np.uint16).tobytes(),
        "F16": values.astype(np.float16).tobytes(),
        "scales": rng.uniform(0.001, 0.01, PATTERN_BYTES // 2).astype(np.float16).tobytes(),
        "I32": rng.integers(0, 256, PATTERN_BYTES, dtype=np.uint8).tobytes(),
        "U32": rng.integers(0, 256, PATTERN_BYTES, dtype=np.uint8).tobytes(),
        "mlx_scales": (rng.uniform(0.001, 0.01, PATTERN_BYTES // 2).astype(np.float32).view(np.uint32) >> 16)
        .astype(np.uint16)
        .tobytes(),
        # e4m3 codes below 0x70 (magnitudes under 1.0; 0x7F, the NaN, never), either sign
        "F8_E4M3": (rng.integers(0, 0x70, PATTERN_BYTES) | (rng.integers(0, 2, PATTERN_BYTES) << 7))
        .astype(np.uint8)
        .tobytes(),
        "F32": rng.uniform(0.001, 0.01, PATTERN_BYTES // 4).astype(np.float32).tobytes(),
    }


def write_checkpoint(folder: Path, p: dict) -> int:
    """Sharded safetensors filled from repeated buffers of valid values (see ``stored_tensors``)."""
    folder.mkdir(parents=True)
    fill = patterns()
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in stored_tensors(p):
        nbytes = int(np.prod(shape)) * DTYPE_SIZES[dtype]
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = encode_header(tensors)
        weight_map.update({name: shard for name, _, _ in tensors})
        with open(folder / shard, "wb") as f:
            f.write(header)
            for name, dtype, shape in tensors:
                scales = "mlx_scales" if dtype == "BF16" else "scales"
                pattern = fill[scales if name.endswith(".scales") else dtype]
                remaining = int(np.prod(shape)) * DTYPE_SIZES[dtype]
                while remaining:
                    chunk = pattern[: min(remaining, len(pattern))]
                    f.write(chunk)
                    remaining -= len(chunk)
        total += offset
    config = {
        "architectures": ["Phi3ForCausalLM" if p.get("fused") else "LlamaForCausalLM"],
        "model_type": "phi3" if p.get("fused") else "llama",
        "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["head_dim"],
        "vocab_size": p["vocab"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    if p.get("quantized") == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    if p.get("quantized") == "mlx4":  # mlx-lm's save_config writes the block under both names
        config["quantization"] = {"group_size": MLX_GROUP, "bits": MLX_BITS, "mode": "affine"}
        config["quantization_config"] = dict(config["quantization"])
    if p.get("quantized") == "awq":
        config["dtype"] = "float16"
        config["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": AWQ_GROUP,
            "zero_point": True,
            "version": "gemm",
        }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    os.sync()
    return total


def make_lock(folder: Path, p: dict, out: Path, legacy: Path | None) -> None:
    from weightlock import build_lock, import_legacy, open_checkpoint, save_lock
    from weightlock.core.lock import source_model_from_config

    source = source_model_from_config(open_checkpoint(folder).config)
    if legacy is not None and legacy.is_file():
        lock = import_legacy(legacy)
        if lock.source_model.num_hidden_layers != p["layers"]:
            raise SystemExit(f"{legacy.name} is for {lock.source_model.num_hidden_layers} layers")
        lock = build_lock(lock.layers, lock.heads, lock.directions, lock.scales, source, default_alpha=6.0)
    else:
        lock = random_lock(source, p)
    if p.get("gated"):  # a gate on each locked layer: random unit probes, thresholds around zero
        from weightlock.core.gate import Gate

        rng = np.random.default_rng(2)
        layers = np.array(sorted(set(lock.layers.tolist())), dtype=np.int64)
        probes = rng.normal(size=(len(layers), p["hidden"]))
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        low, high = np.full(len(layers), -0.3, np.float32), np.full(len(layers), 0.3, np.float32)
        lock.gate = Gate(layers, probes.astype(np.float32), low, high)
    save_lock(lock, out)


def random_lock(source, p: dict):
    """24 random heads (fewer for tiny presets) with random directions and scales."""
    from weightlock import build_lock

    rng = np.random.default_rng(1)
    pairs = rng.choice(p["layers"] * p["heads"], size=min(24, p["layers"] * p["heads"]), replace=False)
    return build_lock(
        pairs // p["heads"],
        pairs % p["heads"],
        rng.normal(size=(len(pairs), p["head_dim"])),
        rng.uniform(0.1, 1, len(pairs)),
        source,
        default_alpha=6.0,
    )


def write_gguf_checkpoint(path: Path, p: dict, out_type: str) -> int:
    """One GGUF file of the preset's widths, written by the gguf package's writer (header) and by hand (data)."""
    import gguf

    path.parent.mkdir(parents=True)
    q4k = gguf.GGMLQuantizationType.Q4_K
    attn_type = gguf.GGMLQuantizationType[out_type]
    h, hd = p["hidden"], p["head_dim"]
    shapes = {name: shape for name, shape in tensor_shapes(p).items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight",
    }
    parts = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    writer = gguf.GGUFWriter(str(path), p.get("model_type", "llama"))
    writer.add_block_count(p["layers"])
    writer.add_head_count(p["heads"])
    writer.add_head_count_kv(p["kv_heads"])
    writer.add_embedding_length(h)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_feed_forward_length(p["intermediate"])
    # one valid attn_output tensor, reused for every layer (its data must dequantize to finite values)
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.02, size=(h, p["heads"] * hd)).astype(np.float32)
    if attn_type == q4k:  # the gguf package cannot quantize K-quants: random codes, sane fp16 scales
        block, size = gguf.GGML_QUANT_SIZES[q4k]
        attn = rng.integers(0, 256, size=(h, p["heads"] * hd // block, size), dtype=np.uint8)
        attn[:, :, 0:4] = np.frombuffer(np.array([0.002, 0.001], dtype=np.float16).tobytes(), dtype=np.uint8)
        attn_bytes = attn.tobytes()
    else:
        attn_bytes = gguf.quants.quantize(weight, attn_type).tobytes()
    layout = []
    for name, shape in shapes.items():
        if name.startswith("model.layers."):
            pieces = name.split(".")  # model.layers.N[.self_attn|.mlp].MODULE.weight|bias
            gguf_name = f"blk.{pieces[2]}.{parts[pieces[-2]]}.{pieces[-1]}"
        else:
            gguf_name = names[name]
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else (attn_type if "attn_output" in gguf_name else q4k)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        writer.add_tensor_info(
            gguf_name,
            byte_shape if qtype != gguf.GGMLQuantizationType.F32 else shape,
            np.dtype(np.uint8) if qtype != gguf.GGMLQuantizationType.F32 else np.dtype(np.float32),
            nbytes,
            raw_dtype=qtype if qtype != gguf.GGMLQuantizationType.F32 else None,
        )
        layout.append((gguf_name, nbytes))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = writer.fout[0]
    pattern = np.random.default_rng(1).integers(0, 256, PATTERN_BYTES, dtype=np.uint8).tobytes()
    writer.write_padding(out, out.tell())
    for gguf_name, nbytes in layout:
        if gguf_name.endswith("attn_output.weight"):
            out.write(attn_bytes)
        elif gguf_name.endswith("norm.weight"):
            out.write(np.ones(nbytes // 4, dtype=np.float32).tobytes())
        elif gguf_name.endswith(".bias"):
            out.write(rng.normal(0, 0.1, nbytes // 4).astype(np.float32).tobytes())
        else:
            remaining = nbytes
            while remaining:
                chunk = pattern[: min(remaining, len(pattern))]
                out.write(chunk)
                remaining -= len(chunk)
        writer.write_padding(out, nbytes)
    writer.close()
    os.sync()
    return path.stat().st_size


def make_gguf_lock(path: Path, p: dict, out: Path) -> None:
    from weightlock import save_lock
    from weightlock.core.lock import SourceModel

    model_type = p.get("model_type", "llama")
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    save_lock(
        random_lock(SourceModel(architecture, model_type, p["layers"], p["heads"], p["head_dim"], p["hidden"]), p),
        out,
    )


def evict(folder: Path) -> None:
    for path in [folder] if folder.is_file() else folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


CHILD = r"""
import json, os, sys, time
mode, src, lock, out = sys.argv[1:5]
# Imports first, so the I/O counters and the clock cover the work alone.
import numpy
import weightlock
from weightlock import apply_lock, load_lock, open_checkpoint
# the modules an apply runs (imported lazily by the dispatcher), as a whole package import did before the layout
# had one: what is timed is the work, not Python loading weightlock's own code (transformers and torch, which the
# class check imports, stay inside the timing)
import weightlock.formats.safetensors.apply, weightlock.formats.safetensors.verify, weightlock.formats.gguf.apply
import weightlock.engines.serving, weightlock.engines.transformers, weightlock.engines.class_check_cache
if mode == "baseline":
    import torch
    from transformers import AutoModelForCausalLM
def io():
    return {k: int(v) for k, v in (l.split(": ") for l in open("/proc/self/io").read().splitlines())}
before = io()
started = time.perf_counter()
if mode == "cold-read":
    ck, lk = open_checkpoint(src), load_lock(lock)
    buf = bytearray(32 << 20)
    for layer in sorted(lk.heads_by_layer()):
        module = f"model.layers.{layer}.self_attn.o_proj."  # the weight, or all its quantized tensors
        for e in [e for name, e in ck.tensors.items() if name.startswith(module)]:
            with open(e.path, "rb", buffering=0) as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # exact reads, no readahead
                pos = e.begin
                while pos < e.end:
                    view = memoryview(buf)[:min(len(buf), e.end - pos)]
                    pos += os.preadv(f.fileno(), [view], pos)
elif mode in ("apply", "apply-first", "apply-copy", "apply-noload"):
    apply_lock(src, lock, out=out, link_mode="copy" if mode == "apply-copy" else "auto",
               loader_check=mode != "apply-noload")
elif mode == "tune-bakes":
    import shutil, transformers  # tune's process has them (its KL pass runs transformers)
    import torch
    bakes = []
    for i, alpha in enumerate((2.0, 4.0, 6.0)):
        t = time.perf_counter()
        apply_lock(src, lock, out=f"{out}-{i}", alpha=alpha)
        bakes.append(time.perf_counter() - t)
    for i in range(3):
        shutil.rmtree(f"{out}-{i}")
    started = time.perf_counter() - (bakes[1] + bakes[2]) / 2  # the seconds reported: the later bakes' mean
elif mode in ("cp", "cp-tree"):
    import subprocess
    subprocess.run(["cp", "-r", src, out], check=True)
    os.sync()
elif mode == "gguf-apply":
    apply_lock(src, lock, out=out)
    os.sync()
elif mode == "baseline":
    lk = load_lock(lock)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer, d in lk.displacements(lk.default_alpha, model.config.num_attention_heads).items():
            o = model.model.layers[layer].self_attn.o_proj
            o.bias = torch.nn.Parameter((o.weight.float() @ torch.from_numpy(d)).to(torch.bfloat16))
    model.config.attention_bias = True  # so the saved biases at least survive a reload
    model.save_pretrained(out)
    os.sync()
seconds = time.perf_counter() - started
after = io()
# VmHWM: this process's own peak (wait4's ru_maxrss would include the parent's, inherited through exec)
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "io": {k: after[k] - before[k] for k in after}, "vm_hwm": hwm}))
"""


def run_child(mode: str, src: Path, lock: Path, out: Path) -> dict:
    if out.is_file():
        out.unlink()
    shutil.rmtree(out, ignore_errors=True)
    evict(src)
    # the class-check cache of this bench alone (the user's is left as it is); apply-first starts it empty
    cache = out.parent / "class-check-cache"
    if mode == "apply-first":
        shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(src), str(lock), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "WEIGHTLOCK_CACHE_DIR": str(cache)},
    )
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read()
    if proc.returncode != 0:
        return {"mode": mode, "error": f"exit {proc.returncode}"}
    result = json.loads(output.strip().splitlines()[-1])
    if out.is_file():
        out_bytes = out.stat().st_size
    else:
        out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    return {
        "mode": mode,
        "seconds": result["seconds"],
        "read_bytes": result["io"]["read_bytes"],
        "write_bytes": result["io"]["write_bytes"],
        "rchar": result["io"]["rchar"],
        "wchar": result["io"]["wchar"],
        # for cp the work is cp's (a small C program); the figure is then the Python harness's, not cp's
        "peak_rss_bytes": result["vm_hwm"],
        "output_bytes": out_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="layers to write (default: the preset's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/weightlock-bench"))
    parser.add_argument(
        "--legacy-lock",
        type=Path,
        default=None,
        help="use this published .safelock (needs the preset's full layer count)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-copy", action="store_true")
    parser.add_argument("--tune", action="store_true", help="also time tune's repeated bakes in one process")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true", help="also print the results as a Markdown block")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--gguf", choices=["Q4_K", "Q8_0"], default=None, help="bench a GGUF file instead")
    parser.add_argument(
        "--gated", action="store_true", help="a gated lock: every MLP is rewritten, so `cp -r` is the floor"
    )
    parser.add_argument(
        "--quantized",
        choices=["awq", "fp8", "mlx4"],
        default=None,
        help="store the decoder's linear layers as AWQ int4, FP8 (128x128 blocks) or mlx-lm's affine int4 (group 64)",
    )
    args = parser.parse_args()
    if args.gguf:
        return bench_gguf(args)

    p = dict(PRESETS[args.preset])
    if args.layers:
        p["layers"] = args.layers
    if args.quantized:
        p["quantized"] = args.quantized
        args.no_baseline = True  # the baseline would have to dequantize the whole model
    if args.gated:
        p["gated"] = True
        args.no_baseline = args.no_copy = True  # transformers has no gated edit to compare with
    shutil.rmtree(args.work, ignore_errors=True)
    src, lock, out = args.work / "src", args.work / "lock.wlock", args.work / "out"
    t = time.perf_counter()
    total = write_checkpoint(src, p)
    print(
        f"wrote {args.preset} ({p['layers']} layers) checkpoint: {total / 2**30:.2f} GiB "
        f"in {time.perf_counter() - t:.0f}s",
        flush=True,
    )
    make_lock(src, p, lock, args.legacy_lock)

    rewrites = p.get("fused") or p.get("gated")  # most bytes rewritten: cp -r of the folder is the floor
    modes = ["cold-read"] + (["cp-tree"] if rewrites else []) + ["apply-first", "apply", "apply-noload"]
    modes += [] if args.no_copy or p.get("fused") else ["apply-copy"]
    modes += ["tune-bakes"] if args.tune else []
    if p["complete"] and not p.get("fused") and not args.no_baseline:  # transformers cannot lock a Phi-3
        modes.append("baseline")
    results = [run_child(mode, src, lock, out) for mode in modes]
    floor = results[0]["seconds"]
    print(
        f"\n{'contender':<11} {'wall s':>8} {'x cold-read':>11} {'read MiB':>10} {'written MiB':>12} "
        f"{'peak RSS MiB':>13}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<11} {r['error']}")
            continue
        print(
            f"{r['mode']:<11} {r['seconds']:>8.2f} {r['seconds'] / floor:>11.2f} "
            f"{r['read_bytes'] / 2**20:>10.1f} {r['write_bytes'] / 2**20:>12.1f} "
            f"{r['peak_rss_bytes'] / 2**20:>13.1f}"
        )
    from weightlock import load_lock

    layers = sorted(load_lock(lock).heads_by_layer())
    o_bytes = len(layers) * p["hidden"] * p["heads"] * p["head_dim"] * 2
    if p.get("quantized"):  # the quantized tensors of each locked o_proj (codes, zero points, scales)
        o_bytes = len(layers) * sum(
            int(np.prod(shape)) * DTYPE_SIZES[dtype]
            for name, dtype, shape in stored_tensors(dict(p, layers=1))
            if ".o_proj." in name
        )
    print(
        f"\ncheckpoint {total / 2**30:.2f} GiB; lock touches {len(layers)} layers = "
        f"{o_bytes / 2**20:.1f} MiB of o_proj weights"
    )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "preset": args.preset,
                    "params": p,
                    "checkpoint_bytes": total,
                    "o_proj_bytes_needed": o_bytes,
                    "results": results,
                },
                indent=2,
            )
        )
    if args.markdown:
        markdown_safetensors(args, p, total, layers, o_bytes, results)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


LABELS = {
    "cold-read": "cold read of the o_proj bytes the lock needs (the floor)",
    "cp-tree": "`cp -r` of the folder, then sync",
    "apply-first": "`weightlock apply`, first on this machine (shards hardlinked; every check of verify, the "
    "transformers class check run: it imports torch and transformers)",
    "apply": "`weightlock apply` again (every check of verify; the class check's verdict recalled from the cache "
    "the first run filled)",
    "tune-bakes": "`tune`'s later bakes: apply at a second and third alpha in one process (mean)",
    "apply-noload": "`weightlock apply --no-loader-check`",
    "apply-copy": "`weightlock apply --link-mode copy`",
    "baseline": "transformers: `from_pretrained`, set biases, `save_pretrained`",
    "cp": "coreutils `cp` of the file, then sync",
    "gguf-apply": "`weightlock apply FILE.gguf --out OUT.gguf` (verify included)",
}
HARNESS_RSS = ("cp", "cp-tree")  # the figure would be the Python harness's, not cp's


def markdown_rows(results: list[dict], floor: float, rounds: bool = False) -> list[list]:
    rows, seen = [], {}
    for r in results:
        label = LABELS[r["mode"]]
        if rounds:
            seen[r["mode"]] = seen.get(r["mode"], 0) + 1
            label = f"{label}, round {seen[r['mode']]}"
        if "error" in r:
            rows.append([label, r["error"], None, None, None, None])
            continue
        rows.append(
            [
                label,
                f"{r['seconds']:.2f}",
                f"{r['seconds'] / floor:.2f}",
                f"{r['read_bytes'] / 2**20:.1f}",
                f"{r['write_bytes'] / 2**20:.1f}",
                "-" if r["mode"] in HARNESS_RSS else f"{r['peak_rss_bytes'] / 2**20:.1f}",
            ]
        )
    return rows


def describe(p: dict, preset: str) -> str:
    widths = {"8b": "Llama-3.1-8B", "phi4": "Phi-4", "70b-attention": "Llama-3.1-70B", "qwen2.5-7b": "Qwen2.5-7B"}[
        preset
    ]
    what = f"{widths} widths, {p['layers']} layers"
    if not p["complete"]:
        what += ", attention tensors only"
    return what


def markdown_safetensors(args, p: dict, total: int, layers: list[int], o_bytes: int, results: list[dict]) -> None:
    import _report

    layouts = {
        "awq": "AWQ int4 GEMM, group 128",
        "fp8": "FP8 e4m3, 128x128 block scales",
        "mlx4": "mlx-lm affine int4, group 64 (bf16 scales and biases)",
    }
    stored = layouts.get(p.get("quantized"), "bf16")
    lock = f"`{args.legacy_lock.name}`" if args.legacy_lock is not None and args.legacy_lock.is_file() else "random"
    lock += " gated" if p.get("gated") else ""
    caption = (
        f"`bench_apply.py`: {describe(p, args.preset)}, {stored}, {total / 2**30:.2f} GiB of safetensors; "
        f"{lock} lock touching {len(layers)} layers ({o_bytes / 2**20:.1f} MiB of o_proj weights). Each contender "
        "ran in a fresh process after the checkpoint's pages were evicted from the page cache."
    )
    header = ["contender", "wall s", "x cold read", "read MiB", "written MiB", "peak RSS MiB"]
    notes = "Peak RSS is the contender's own VmHWM; read and written are /proc/<pid>/io read_bytes and write_bytes."
    by_mode = {r["mode"]: r for r in results if "error" not in r}
    if "cp-tree" in by_mode:
        notes += " `cp`'s peak RSS is not measured (-)."
        if "apply" in by_mode:
            ratio = by_mode["apply"]["seconds"] / by_mode["cp-tree"]["seconds"]
            notes += f" `weightlock apply` took {ratio:.2f}x the time of the `cp -r` (the floor for this layout)."
    _report.emit(caption, _report.table(header, markdown_rows(results, results[0]["seconds"])), notes)


REWRITTEN = "`qwen2` (rewritten as `llama` by apply: Q/K rows permuted, keys renamed) "


def bench_gguf(args) -> None:
    p = dict(PRESETS[args.preset], complete=True)
    if args.layers:
        p["layers"] = args.layers
    shutil.rmtree(args.work, ignore_errors=True)
    src, lock, out = args.work / "src" / "model.gguf", args.work / "lock.wlock", args.work / "out.gguf"
    t = time.perf_counter()
    total = write_gguf_checkpoint(src, p, args.gguf)
    print(
        f"wrote {args.preset} ({p['layers']} layers) GGUF, attn_output {args.gguf}: {total / 2**30:.2f} GiB "
        f"in {time.perf_counter() - t:.0f}s",
        flush=True,
    )
    make_gguf_lock(src, p, lock)
    results = [run_child(mode, src, lock, out) for mode in ("cp", "gguf-apply", "cp", "gguf-apply")]
    floor = min(r["seconds"] for r in results if r["mode"] == "cp")
    print(f"\n{'contender':<11} {'wall s':>8} {'x cp':>6} {'read MiB':>10} {'written MiB':>12} {'peak RSS MiB':>13}")
    for r in results:
        print(
            f"{r['mode']:<11} {r['seconds']:>8.2f} {r['seconds'] / floor:>6.2f} {r['read_bytes'] / 2**20:>10.1f} "
            f"{r['write_bytes'] / 2**20:>12.1f} {r['peak_rss_bytes'] / 2**20:>13.1f}"
        )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"preset": args.preset, "gguf": args.gguf, "params": p, "file_bytes": total, "results": results},
                indent=2,
            )
        )
    if args.markdown:
        import _report

        from weightlock import load_lock

        locked = len(load_lock(lock).heads_by_layer())
        caption = (
            f"`bench_apply.py --gguf`: {describe(p, args.preset)}, one "
            + (REWRITTEN if p.get("model_type") == "qwen2" else "")
            + f"GGUF file of {total / 2**30:.2f} GiB "
            f"(every weight Q4_K-sized, attn_output {args.gguf} with valid data, the rest a byte pattern); random "
            f"lock touching {locked} layers. Cold page cache before each run; two rounds."
        )
        header = ["contender", "wall s", "x fastest cp", "read MiB", "written MiB", "peak RSS MiB"]
        notes = "Peak RSS is the contender's own VmHWM; `cp`'s is not measured (-)."
        _report.emit(caption, _report.table(header, markdown_rows(results, floor, rounds=True)), notes)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
