"""Quantized checkpoints in, the same format out: FP8 block-scaled (DeepSeek-V3/R1, Kimi-K2,
Qwen3-*-FP8, GLM-4.5-FP8) and MXFP4 (gpt-oss).

    uncurl prune --model ./Qwen3-30B-A3B-FP8 --keep 64 --out runs/k64               # FP8 in, FP8 out
    uncurl prune --model ./Qwen3-30B-A3B-FP8 --keep 64 --dequantize --out runs/bf16 # full precision, on purpose

A format is one ``Codec`` in ``CODECS``, found by ``config.json``'s ``quantization_config.quant_method``:
which tensors it stores quantized and under which names (``parts``: the quantized tensor and its
scales, e.g. ``w.weight`` + ``w.weight_scale_inv``, or ``X_blocks`` + ``X_scales``), and how to
``dequantize`` and ``quantize`` one tensor as transformers holds it. Any other scheme (gptq, awq,
bitsandbytes, compressed-tensors, ...) is refused before any weight is read (``codec_for``), never
written in another precision; ``--dequantize`` lets transformers dequantize it on load instead.

Reading: uncurl reads the input's shards itself (``Source``, safetensors' pread reader; headers
checked up front by ``check_source``: every scale fits its weight) and hands transformers each
quantized tensor dequantized by the codec, in float32, as it is read (``dequantized_state``), with
a config without quantization_config: the model is held dequantized on CPU and GPU alike, in the
checkpoint's dtype (or ``--dtype``), and the profile runs on those dequantized weights. Not
transformers' own FP8 dequantization: in 5.23 it derives the block size from the scale grid, which
is wrong for a partial last block (DeepSeek-V3's ``kv_a_proj_with_mqa [576, 7168]`` has 5 row
blocks of 128: it raises there, and silently misplaces the scales where the rows happen to divide).

Writing: the checkpoint is written from the input's own files, streamed one decoder layer at a time
in the pruned model's save-time names (``write_quantized``):

- a tensor uncurl did not change (attention, embeddings, dense layers, shared experts) and every
  expert of a singleton group (every expert under a pruning criterion) is copied from the input's
  bytes with its scales, the experts renumbered 0..K-1: bit-identical to the input's;
- an expert that merges a group is quantized again from the pruned model's merged tensor (the
  members dequantized, merged in float32 by ``merge.py``'s rule, cast to the run's dtype: with
  ``--dtype float32`` that is the float32 merge itself) in the input's block layout and scale dtype;
  experts stored per expert (FP8: ``experts.{j}.gate_proj.weight``) are renamed, experts stored fused
  with the expert axis first (MXFP4: ``experts.gate_up_proj_blocks [E, ...]``) are cut row by row;
- router rows and per-expert router buffers are uncurl's (sliced or merged by the router rule), in
  the dtype the input stores them in.

``config.json`` keeps the input's ``quantization_config`` as it was (``modules_to_not_convert`` and
all) and its ``dtype``; expert count and top-k are rewritten as for any model.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .devices import on
from .errors import UncurlError


_ST = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F32": torch.float32, "BF16": torch.bfloat16,
       "F16": torch.float16, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class Spec:
    """One tensor of the input's files, as its header describes it."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class Codec:
    """One quantization format: which tensors it quantizes, where their scales are, the arithmetic."""

    name = ""

    def detect(self, qc: dict) -> bool:
        raise NotImplementedError

    def check_config(self, qc: dict) -> str | None:
        """What in ``qc`` this codec does not handle (None: all of it)."""
        return None

    def describe(self, qc: dict) -> str:
        raise NotImplementedError

    def is_quantized(self, spec: Spec) -> bool:
        raise NotImplementedError

    def parts(self, name: str) -> tuple[str, ...]:
        """The names of the tensors that store tensor ``name`` (as transformers saves it, in full
        precision) once quantized: the quantized tensor, then its scales."""
        raise NotImplementedError

    def full_name(self, stored: str) -> str:
        """The name of the full-precision tensor that stored tensor ``stored`` may be a part of."""
        raise NotImplementedError

    def stored_as(self, name: str, specs: dict[str, "Spec"]) -> tuple[str, ...] | None:
        """``parts(name)`` when ``specs`` (a checkpoint's headers) store ``name`` quantized, else None."""
        parts = self.parts(name)
        return parts if parts[0] in specs and self.is_quantized(specs[parts[0]]) else None

    def part_shapes(self, shape: tuple[int, ...], qc: dict) -> tuple[tuple[int, ...], ...]:
        """The shapes of ``parts`` for a full-precision tensor of ``shape``."""
        raise NotImplementedError

    def check(self, specs: dict[str, Spec], qc: dict) -> str | None:
        """The first quantized tensor whose scales do not fit it, as a sentence (None: all fit)."""
        raise NotImplementedError

    def dequantize(self, q: torch.Tensor, scales: tuple[torch.Tensor, ...], qc: dict) -> torch.Tensor:
        """float32, shaped as transformers holds the tensor in full precision."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, like: tuple[Spec, ...], qc: dict) -> tuple[torch.Tensor, ...]:
        """``w`` (full precision, as transformers holds it) as its ``parts``, in the dtypes of ``like``
        (the input's specs of the same parts)."""
        raise NotImplementedError


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# quantization_config.fmt: DeepSeek writes "e4m3", MiniMax-M2 "float8_e4m3fn" (torch's name); transformers reads
# neither (the weights' dtype decides), the float8 tensors are checked to be e4m3 (``Fp8Block.check``)
FP8_FORMATS = (None, "e4m3", "float8_e4m3fn")
# quantization_config.scale_fmt: "float" (DeepSeek-V3), or "ue8m0" (DeepSeek-V3.1): every block scale a power of
# two, still stored as float32 (a UE8M0 exponent for the kernels); a merged expert is quantized with its scales
# rounded up to one (``power_of_two_above``)
SCALE_FORMATS = (None, "float", "ue8m0")


def power_of_two_above(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each (positive, float32) value of ``x``, exactly (from its exponent:
    x = m * 2^e with 0.5 <= m < 1, so 2^e, or x itself when m is 0.5). Rounding a UE8M0 block scale up
    keeps every quantized value within the e4m3 range."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), torch.where(mantissa == 0.5, exponent - 1, exponent))


class Fp8Block(Codec):
    """DeepSeek-V3's FP8: ``float8_e4m3fn [.., out, in]`` weights, each with ``weight_scale_inv``
    ``[.., ceil(out/bo), ceil(in/bi)]`` (float32 or bfloat16) for ``weight_block_size = [bo, bi]``;
    the real weight is ``q * scale`` block by block."""

    name = "fp8"

    def detect(self, qc):
        return qc.get("quant_method") == "fp8"

    def check_config(self, qc):
        block = qc.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)):
            return f"weight_block_size {block!r} (per-tensor FP8 scales are not supported yet)"
        for key, accepted in (("fmt", FP8_FORMATS), ("scale_fmt", SCALE_FORMATS),
                              ("activation_scheme", (None, "dynamic")), ("expert_dtype", (None, "fp8"))):
            if qc.get(key) not in accepted:
                return f"{key} {qc.get(key)!r} (supported: {', '.join(repr(a) for a in accepted if a)})"
        return None

    def describe(self, qc):
        bo, bi = qc["weight_block_size"]
        return f"fp8 (e4m3, {bo}x{bi} blocks{', ue8m0 scales' if qc.get('scale_fmt') == 'ue8m0' else ''})"

    def is_quantized(self, spec):
        return spec.dtype == torch.float8_e4m3fn

    def parts(self, name):
        return name, (name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv")

    def part_shapes(self, shape, qc):
        return tuple(shape), self.scale_shape(shape, qc)

    def full_name(self, stored):
        return stored.removesuffix("_scale_inv")  # w.weight_scale_inv -> w.weight; w.weight -> itself

    def scale_shape(self, shape, qc) -> tuple[int, ...]:
        bo, bi = qc["weight_block_size"]
        return (*shape[:-2], -(-shape[-2] // bo), -(-shape[-1] // bi))

    def check(self, specs, qc):
        scales = {}
        for name, spec in specs.items():
            if not self.is_quantized(spec):
                continue
            scale = self.parts(name)[1]
            scales[scale] = name
            if len(spec.shape) < 2:
                return f"{name} is float8 with shape {list(spec.shape)}; block-scaled weights have at least two axes"
            if scale not in specs:
                return f"{name} is float8 but the checkpoint has no {scale} (its scales)"
            want, got = self.scale_shape(spec.shape, qc), specs[scale]
            if got.shape != want:
                bo, bi = qc["weight_block_size"]
                return (f"{scale} has shape {list(got.shape)}, but {name} {list(spec.shape)} in {bo}x{bi} blocks "
                        f"needs {list(want)}")
            if got.dtype not in (torch.float32, torch.bfloat16):
                return f"{scale} is {got.dtype}; FP8 block scales are float32 or bfloat16"
        for name, spec in specs.items():
            if name.endswith("_scale_inv") and name not in scales:
                return f"{name} is a scale, but its weight is missing or not float8"
        return None

    def _expand(self, s: torch.Tensor, shape, qc) -> torch.Tensor:
        bo, bi = qc["weight_block_size"]
        return s.repeat_interleave(bo, -2)[..., : shape[-2], :].repeat_interleave(bi, -1)[..., : shape[-1]]

    def dequantize(self, q, scales, qc):
        return q.to(torch.float32) * self._expand(scales[0].to(q.device, torch.float32), q.shape, qc)

    def quantize(self, w, like, qc):
        bo, bi = qc["weight_block_size"]
        w = w.to(torch.float32)
        rows, cols = w.shape[-2:]
        padded = torch.nn.functional.pad(w.abs(), (0, -cols % bi, 0, -rows % bo))
        blocks = padded.unflatten(-1, (-1, bi)).unflatten(-3, (-1, bo))  # [.., R, bo, C, bi]
        amax = blocks.amax(dim=(-3, -1))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        if qc.get("scale_fmt") == "ue8m0":
            scale = power_of_two_above(scale)
        scale = scale.to(like[1].dtype)
        q = (w / self._expand(scale.to(torch.float32), w.shape, qc)).clamp(-FP8_MAX, FP8_MAX).to(like[0].dtype)
        return q, scale


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1


class Mxfp4(Codec):
    """gpt-oss's MXFP4: a full-precision expert tensor ``X [E, A, B]`` (as transformers holds it) is
    stored transposed as ``X_blocks uint8 [E, B, A/32, 16]`` (two E2M1 values a byte, the even one in
    the low nibble, 32 values a block) and ``X_scales uint8 [E, B, A/32]`` (E8M0: 2^(byte - 127))."""

    name = "mxfp4"

    def detect(self, qc):
        return qc.get("quant_method") == "mxfp4"

    def describe(self, qc):
        return "mxfp4 (e2m1, 32-value blocks, e8m0 scales)"

    def is_quantized(self, spec):
        return spec.dtype == torch.uint8

    def parts(self, name):
        return name + "_blocks", name + "_scales"

    def part_shapes(self, shape, qc):
        *lead, a, b = shape
        return (*lead, b, a // 32, 16), (*lead, b, a // 32)

    def full_name(self, stored):
        return stored.removesuffix("_blocks").removesuffix("_scales")

    def check(self, specs, qc):
        for name, spec in specs.items():
            if name.endswith("_blocks"):
                scales = name.removesuffix("_blocks") + "_scales"
                if scales not in specs:
                    return f"{name} has no {scales} (its scales)"
                if spec.dtype != torch.uint8 or specs[scales].dtype != torch.uint8:
                    return f"{name} and {scales} must be uint8 (packed E2M1 values, E8M0 exponents)"
                if spec.shape[-1:] != (16,) or specs[scales].shape != spec.shape[:-1]:
                    return (f"{scales} has shape {list(specs[scales].shape)}, but {name} {list(spec.shape)} (16 bytes "
                            f"a block) needs {list(spec.shape[:-1])}")
            elif name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" not in specs:
                return f"{name} is a scale, but its blocks ({name.removesuffix('_scales')}_blocks) are missing"
        return None

    def dequantize(self, q, scales, qc):
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=q.device)
        q = q.to(torch.uint8)
        values = torch.stack([lut[(q & 0x0F).long()], lut[(q >> 4).long()]], -1).flatten(-2)  # [.., B, G, 32]
        values = torch.ldexp(values, scales[0].to(q.device, torch.int32).sub(127).unsqueeze(-1))
        return values.flatten(-2).transpose(-1, -2).contiguous()

    def quantize(self, w, like, qc):
        g = w.to(torch.float32).transpose(-1, -2).unflatten(-1, (-1, 32))  # [.., B, G, 32]
        amax = g.abs().amax(-1)
        # the smallest power of two that brings the block's largest value to at most 6 (no clipping)
        exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0)).clamp(-127, 127)
        x = g / torch.ldexp(torch.ones_like(amax), exp.to(torch.int32)).unsqueeze(-1)
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)  # bucketize: one device
        magnitude = torch.bucketize(x.abs().contiguous(), mids).to(torch.uint8)  # the nearest E2M1 value
        nibble = magnitude | (((x < 0) & (magnitude > 0)).to(torch.uint8) << 3)  # zero is +0
        packed = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
        return packed.contiguous(), (exp + 127).to(torch.uint8)


CODECS: dict[str, Codec] = {c.name: c for c in (Fp8Block(), Mxfp4())}


def quantization_config(config) -> dict | None:
    """``config``'s (a transformers config or config.json's dict) quantization_config as a dict, if any."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return dict(qc) if isinstance(qc, dict) else qc.to_dict()


def scheme(qc: dict) -> str:
    return str(qc.get("quant_method") or qc.get("quant_type") or "unknown")


def codec_for(qc: dict | None, where: str, dequantize: bool = False) -> Codec | None:
    """The codec that reads and writes ``qc``'s format; None for an unquantized checkpoint, or for any
    scheme with ``dequantize`` (transformers then dequantizes it on load, see ``check_dequantized``).
    Anything else is refused, naming the scheme."""
    if qc is None:
        return None
    codec = next((c for c in CODECS.values() if c.detect(qc)), None)
    problem = codec.check_config(qc) if codec else None
    if codec is not None and problem is None:
        return codec
    if dequantize:
        return codec if problem is None else None
    what = f"{scheme(qc)!r} with {problem}" if problem else repr(scheme(qc))
    raise UncurlError(
        f"{where} is quantized as {what} (config.json quantization_config); uncurl reads and writes back only "
        f"{', '.join(CODECS)} (block-scaled) checkpoints in their own format, and never writes a quantized model in "
        f"another precision silently: dequantize it first (transformers: from_pretrained, model.dequantize(), "
        f"save_pretrained) and prune that, or pass --dequantize to have transformers dequantize it on load and "
        f"write full precision")


def check_dequantized(model, qc: dict, where: str) -> None:
    """After a --dequantize load: transformers must have dequantized the weights (else uncurl cannot
    merge them)."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise UncurlError(f"{where}: transformers keeps {scheme(qc)!r} weights quantized in memory, so uncurl cannot "
                          f"prune them even with --dequantize; dequantize the checkpoint first (from_pretrained, "
                          f"model.dequantize(), save_pretrained) and prune that")


@dataclass
class Source:
    """A quantized input's files: every tensor's header, and its format."""

    folder: Path
    codec: Codec
    config: dict  # quantization_config, as config.json has it
    raw_config: dict  # config.json
    specs: dict[str, Spec] = field(default_factory=dict)
    _handles: dict = field(default_factory=dict, repr=False)

    @property
    def format(self) -> str:
        return self.codec.describe(self.config)

    @property
    def stored_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())

    def _handle(self, name: str):
        """The open (pread) handle of the shard holding ``name``; each shard is opened once (``close``)."""
        from safetensors import safe_open

        file = self.specs[name].file
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu", backend="pread")
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        """An input tensor as stored."""
        return self._handle(name).get_tensor(name)

    def slice(self, name: str):
        """An input tensor as a safetensors slice (read when indexed), as from_pretrained takes it."""
        return self._handle(name).get_slice(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def stored_as(self, name: str) -> tuple[str, ...]:
        """The input tensors that store ``name`` (a tensor as transformers saves it): its quantized
        parts, or itself."""
        return self.codec.stored_as(name, self.specs) or ((name,) if name in self.specs else ())

    def dequantized(self, name: str) -> torch.Tensor:
        """An input tensor in float32, as transformers holds it."""
        parts = self.codec.stored_as(name, self.specs)
        if parts is None:
            return self.read(name).to(torch.float32)
        q, *scales = (self.read(p) for p in parts)
        return self.codec.dequantize(q, tuple(scales), self.config)


class _Dequantized:
    """A quantized tensor as from_pretrained reads a state dict's entry (``entry[...]``): dequantized
    by the codec, in float32 (transformers casts it to the parameter's dtype)."""

    def __init__(self, source: Source, name: str):
        self.source, self.name = source, name

    def __getitem__(self, index):
        return self.source.dequantized(self.name)[index]


def dequantized_state(source: Source) -> dict:
    """The input's state dict as transformers saves it in full precision: each quantized tensor (its
    parts) one entry dequantized when read, every other tensor a pread slice."""
    codec, quantized = source.codec, {}
    for name in {spec.file: name for name, spec in source.specs.items()}.values():
        source._handle(name)  # every shard opened here, not by transformers' loading threads
    for name in source.specs:
        full = codec.full_name(name)
        parts = codec.stored_as(full, source.specs)
        if parts is not None and name in parts:
            quantized[full] = parts
    parts = {p for ps in quantized.values() for p in ps}
    state = {name: source.slice(name) for name in source.specs if name not in parts}
    state.update({full: _Dequantized(source, full) for full in quantized})
    return state


def without_quantization(config):
    """A copy of a transformers config without its quantization_config (the model is held dequantized)."""
    config = copy.deepcopy(config)
    del config.quantization_config
    return config


def headers(files: list[Path]) -> dict[str, Spec]:
    """Every tensor of the safetensors ``files`` (name -> file, dtype, shape), from the headers alone."""
    from safetensors import safe_open

    specs = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                dtype = _ST.get(view.get_dtype())
                if dtype is None:
                    raise UncurlError(f"{path}: tensor {name} has dtype {view.get_dtype()}, which uncurl cannot read")
                specs[name] = Spec(path, dtype, tuple(view.get_shape()))
    return specs


def check_source(folder: Path, raw_config: dict, dequantize: bool = False) -> Source | None:
    """Before any weight is read: a local folder's quantization scheme is one uncurl keeps (else exit 2,
    naming it) and every quantized tensor's scales fit its shape (else exit 2, naming the tensor).
    None: not quantized, or --dequantize."""
    from .load import checkpoint_files

    qc = quantization_config(raw_config)
    codec = codec_for(qc, f"model folder {folder}", dequantize)
    if codec is None:
        return None
    files = checkpoint_files(folder)
    if not files:
        raise UncurlError(f"model folder {folder} is quantized ({scheme(qc)}) but has no safetensors shards; uncurl "
                          f"reads quantized checkpoints from safetensors only")
    source = Source(folder, codec, qc, raw_config, headers(files))
    problem = codec.check(source.specs, qc)
    if problem:
        raise UncurlError(f"model folder {folder} is damaged: {problem}; its quantization_config declares "
                          f"{source.format}. Re-download or re-save it")
    return source


# ---- writing: the input's files, streamed in the pruned model's names -----------------------------

def _expert_source(name: str, layers, plans, adapter, tail_start) -> tuple[str, tuple[int, ...]] | None:
    """For a save-time name of a per-expert tensor ``<layer>.experts.<k>.<rest>``: (the name of member
    j's tensor in the input, with {} for j, the group's members); None for any other tensor."""
    for layer in layers:
        prefix = f"{layer.name}.{adapter.experts_attr}."
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if not index.isdigit() or not rest:
                return None
            k, groups = int(index), plans[layer.name].groups
            members = tuple(groups[k]) if k < len(groups) else (tail_start + k - len(groups),)
            return prefix + "{}." + rest, members
    return None


def _fused_groups(name: str, layers, plans, adapter) -> list[tuple[int, ...]] | None:
    """The groups of a layer's fused expert tensor ``<layer>.experts.<tensor>`` (expert axis first)."""
    for layer in layers:
        prefix = f"{layer.name}.{adapter.experts_attr}."
        short = name[len(prefix):]
        if name.startswith(prefix) and "." not in short and short not in adapter.experts_common:
            return [tuple(g) for g in plans[layer.name].groups]
    return None


@dataclass(frozen=True)
class _Named:
    """An MoE block known by its name alone (``write_quantized``'s extra runs)."""

    name: str


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def write_quantized(model, adapter, plans: dict, source: Source, folder: Path, shard_size, extra=()) -> int:
    """The pruned ``model``'s checkpoint in ``source``'s format (see the module doc): safetensors shards
    as transformers names and splits them, index, config.json with the input's quantization_config,
    generation config. Returns the weight bytes written.

    Each tensor the pruned model saves (its name as ``save_pretrained`` writes it) is one of:
    ``copy`` (the input's tensor, or its quantized parts, byte for byte), ``quantize`` (a merged
    per-expert tensor, quantized like the input's), ``rows`` (a fused expert tensor, expert axis
    first: a singleton group's rows are the input's bytes, a merged group's are quantized) or ``cast``
    (uncurl's tensor in the input's dtype: router rows, unquantized expert tensors that merged).
    ``extra``: runs of tensors beside the model's, named as the model would hold them (its MTP
    blocks, ``mtp.py``), whose MoE blocks are the ``plans`` the model has no layer for."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from .adapters import expert_count, find_moe_layers
    from .offload import read_tensor
    from .save import _layer_runs, _ShardWriter

    codec, qc = source.codec, source.config
    layers = find_moe_layers(model, adapter)
    own = {layer.name for layer in layers}
    layers += [_Named(name) for name in plans if name not in own]  # the extra runs' MoE blocks
    tail_start = expert_count(source_config(source), adapter)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    runs = [run for _, run in _layer_runs(state)] + [run for _, run in extra]
    routers = tuple(f"{layer.name}.{adapter.router_attr}." for layer in layers)

    def missing(name: str, src: str) -> UncurlError:
        return UncurlError(f"the pruned model's {name} has no counterpart {src} in {source.folder}: its files name "
                           f"tensors otherwise than transformers saves them; pass --dequantize to write full precision")

    def plan_for(name: str, shape) -> tuple:
        """(action, input tensor it comes from, its parts in the input, the output's parts)."""
        expert = _expert_source(name, layers, plans, adapter, tail_start)
        if expert is not None:
            pattern, members = expert
            src = pattern.format(members[0])
            parts = source.stored_as(src)
            if not parts:
                raise missing(name, src)
            quantized = parts != (src,)
            out = codec.parts(name) if quantized else (name,)
            if len(members) == 1:
                return "copy", src, parts, out
            return ("quantize" if quantized else "cast"), src, parts, out
        parts = source.stored_as(name)
        if not parts:
            raise missing(name, name)
        quantized = parts != (name,)
        groups = _fused_groups(name, layers, plans, adapter) if quantized else None
        if groups is not None:
            if adapter.expert_axis(name) != 0 or shape[0] != len(groups):
                raise UncurlError(f"{name}: uncurl writes back quantized fused experts with the expert axis first and "
                                  f"no extra rows; pass --dequantize")
            return "rows", name, parts, codec.parts(name), groups
        if quantized:  # uncurl changes only experts and routers: a quantized tensor elsewhere is the input's
            if tuple(codec.part_shapes(tuple(shape), qc)) != tuple(source.specs[p].shape for p in parts):
                raise UncurlError(f"uncurl changed {name}, which {source.folder} stores quantized outside the experts; "
                                  f"pass --dequantize")
            return "copy", name, parts, codec.parts(name)
        if source.specs[name].shape == tuple(shape) and not name.startswith(routers):
            return "copy", name, parts, (name,)
        return "cast", name, parts, (name,)

    specs, actions = {}, {}
    for run in runs:  # pass 1, on meta stand-ins: every output tensor's name, shape and dtype
        stand_ins = {name: torch.empty_like(t, device="meta") for name, t in run.items()}
        for name, t in revert_weight_conversion(model, stand_ins).items():
            action, src, parts, out, *_ = actions[name] = plan_for(name, t.shape)
            if action == "copy":
                shapes = [source.specs[p].shape for p in parts]
            elif action == "cast":
                shapes = [t.shape]
            else:
                shapes = codec.part_shapes(t.shape, qc)
            for o, p, shape in zip(out, parts, shapes):
                specs[o] = _meta(shape, source.specs[p].dtype)
    split = split_state_dict_into_shards_factory(
        {n: (n,) for n in specs}, get_storage_id=lambda v: v[0],
        get_storage_size=lambda v: specs[v[0]].numel() * specs[v[0]].element_size(),
        filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    shards = {file: _ShardWriter(folder / file, {n: specs[n] for n in names})
              for file, names in split.filename_to_tensors.items()}
    where = {name: shards[file] for file, names in split.filename_to_tensors.items() for name in names}
    try:  # pass 2: one decoder layer at a time
        for run in runs:
            converted = revert_weight_conversion(model, {n: read_tensor(model, n, t) for n, t in run.items()})
            for name, tensor in converted.items():
                action, src, parts, out, *groups = actions[name]
                like = tuple(source.specs[p] for p in parts)
                # one device: the input's bytes are read to the CPU, so is what is quantized again (on the
                # model's device, where the arithmetic is fast) before the two meet in a stack or a file
                if action == "copy":
                    written = [source.read(p) for p in parts]
                elif action == "quantize":
                    written = [on(t, "cpu") for t in codec.quantize(tensor, like, qc)]
                elif action == "cast":
                    written = [on(tensor, "cpu").to(like[0].dtype)]
                else:  # rows
                    originals = [source.read(p) for p in parts]
                    rows = [[o[g[0]] for o in originals] if len(g) == 1
                            else [on(t, "cpu") for t in codec.quantize(tensor[k], like, qc)]
                            for k, g in enumerate(groups[0])]
                    written = [torch.stack([r[i] for r in rows]) for i in range(len(parts))]
                for o, t in zip(out, written):
                    where[o].write(o, t)
            del converted
    finally:
        for shard in shards.values():
            shard.file.close()
        source.close()
    unwritten = sorted(n for shard in shards.values() for n in shard.missing)
    if unwritten:
        raise RuntimeError(f"quantized save never wrote {unwritten[:5]}")
    total = sum(t.numel() * t.element_size() for t in specs.values())
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    dtype = source.raw_config.get("dtype", source.raw_config.get("torch_dtype"))
    if dtype is not None:
        config.dtype = dtype
    config.quantization_config = copy.deepcopy(source.raw_config["quantization_config"])
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    return total


def source_config(source: Source):
    """The input's transformers config (for its expert count)."""
    from .repo import read_config

    return read_config(str(source.folder))[0]
