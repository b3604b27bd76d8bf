"""Every megatron-core patch this project needs, in one place.

megatron-core 0.16.1 assumes CUDA in a handful of spots and has three bugs
that show on its local (non Transformer Engine) layer spec, on any device.
Each patch below says the mcore version it was written against, the symptom
it removes and why it is correct. Patches are applied only when needed (no
CUDA, no TE, or the local spec), at most once, by `apply()`,
which returns the names of the active patches. `check()` reports, per patch,
whether the code it targets still looks as expected: a test asserts that, so
an mcore upgrade that moves or fixes the code fails loudly instead of leaving
a dead or misfiring patch behind.

Design: most CUDA assumptions are `torch.cuda.current_device()` used as a
device, `device="cuda"` literals and `torch.cuda.synchronize()`. Rather than
copy mcore functions, the affected modules get a `torch` proxy (`_CpuTorch`)
in their globals whose `torch.cuda.current_device()` answers the default
device (cpu, or meta inside `with torch.device("meta")`) and whose tensor
factories map a CUDA device argument to it. Only the listed modules see it.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import importlib.util
import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch

MCORE_VERSION = "0.16.1"


def _cuda_absent() -> bool:
    return not torch.cuda.is_available()


def _te_absent() -> bool:
    return importlib.util.find_spec("transformer_engine") is None


def _local_spec() -> bool:
    """The builder's default spec is the local one (see build.te_available)."""
    return _cuda_absent() or _te_absent()


def _source_has(module: str, *needles: str, attr: str | None = None) -> bool:
    """Do all `needles` occur in the module's source file (or in its top-level `attr`)?

    Reads the file, not the live objects, so it answers the same after apply().
    """
    src = inspect.getsource(importlib.import_module(module))
    if attr is not None:
        tree = ast.parse(src)
        nodes = [n for n in tree.body if getattr(n, "name", None) == attr]
        if not nodes:
            return False
        src = ast.get_source_segment(src, nodes[0]) or ""
    return all(n in src for n in needles)


# ------------------------------------------------------------------ the proxy
def _is_cuda(device) -> bool:
    if isinstance(device, int):  # a CUDA ordinal, as current_device() returns
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuCuda:
    """`torch.cuda` as seen by a patched module: no device, nothing to sync."""

    @staticmethod
    def current_device():
        return torch.get_default_device()

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_FACTORIES = {"empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand"}


class _CpuTorch(types.ModuleType):
    """`torch` with CUDA device requests redirected to the default device."""

    cuda = _CpuCuda()

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        obj = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, _f=obj, **kwargs):
                if _is_cuda(kwargs.get("device")):
                    kwargs["device"] = torch.get_default_device()
                return _f(*args, **kwargs)
            return factory
        return obj


_CPU_TORCH = _CpuTorch()


def _use_cpu_torch(*modules: str) -> Callable[[], None]:
    def do():
        for m in modules:
            importlib.import_module(m).torch = _CPU_TORCH
    return do


def _cpu_torch_applies(*modules: str) -> Callable[[], bool]:
    def check():
        return all(_source_has(m, "torch.cuda.") or _source_has(m, "'cuda'") or _source_has(m, '"cuda"')
                   for m in modules)
    return check


# -------------------------------------------------------------- patch bodies
def _cpu_rng_tracker():
    """A tracker with the same named, seeded streams, kept as CPU generator states."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _no_te_router_gemm():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # the torch.addmm fallback below it is then taken


def _viewless_size1_reductions():
    """Group of size 1: return a copy, not the input, from the reduce functions.

    An autograd Function that returns its input unchanged yields a *view*;
    mlp.py then does `output += bias * prob` on it and autograd refuses.
    """
    from megatron.core.tensor_parallel import mappings

    for cls in (mappings._ReduceFromModelParallelRegion, mappings._ReduceScatterToSequenceParallelRegion):
        orig = cls.forward

        def forward(ctx, input_, *args, _orig=orig, **kwargs):
            out = _orig(ctx, input_, *args, **kwargs)
            return out.clone() if out is input_ else out

        forward._gptoss_orig = orig
        cls.forward = staticmethod(forward)


def _cpu_alltoall_dispatcher():
    """alltoall dispatcher without CUDA streams; split sizes as Python lists."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher as D

    # The constructor creates a side stream only when this class attr is None.
    D.cuda_dtoh_stream = object()

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        # On CPU the "device-to-host" copy is a no-op, but all_to_all_single
        # (gloo) needs int lists for split sizes, as mcore gets from .numpy() on GPU.
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for attr in ("input_splits", "output_splits", "output_splits_tp"):
                v = getattr(self, attr, None)
                if torch.is_tensor(v):
                    setattr(self, attr, v.tolist())
        return tokens_per_expert

    D._maybe_dtoh_and_synchronize = _maybe_dtoh_and_synchronize


def _torch_norm_sequence_parallel():
    """Build the torch norm as without SP, then tag its weights sequence-parallel.

    That tag is exactly what TE/Apex norms set: finalize_model_grads then
    all-reduces the norm grads across TP ranks (each saw part of the sequence).
    """
    from megatron.core.transformer import torch_norm

    orig = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return orig(cls, config, *args, **kwargs)
        no_sp = copy.copy(config)  # shallow: no __post_init__ re-validation
        no_sp.sequence_parallel = False
        norm = orig(cls, no_sp, *args, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    __new__._gptoss_orig = orig
    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _window_keeps_given_mask():
    """Sliding-window layers AND the window with a given attention mask (per-document packing)."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer import utils as tutils

    orig = FusedScaleMaskSoftmax.forward_torch_softmax

    def forward_torch_softmax(self, input, mask, softmax_offset=None):
        window_size = self.window_size
        if window_size is None or mask is None:
            return orig(self, input, mask, softmax_offset)
        window = tutils.get_sliding_window_causal_mask(input.size(2), input.size(3), window_size)
        self.window_size = None  # orig then applies the combined mask as given
        try:
            return orig(self, input, mask | window.to(mask.device), softmax_offset)
        finally:
            self.window_size = window_size

    forward_torch_softmax._gptoss_orig = orig
    FusedScaleMaskSoftmax.forward_torch_softmax = forward_torch_softmax


def _rewrite_source(owner, attr: str, replacements: list[tuple[str, str]]) -> None:
    """Recompile `owner.attr` from mcore's own source with literal replacements.

    Used only where the CUDA assumption is a string compared with
    `tensor.type()`, which no proxy can intercept. Each `old` must occur, so
    a changed mcore fails here (and in check()) instead of patching nothing.
    """
    import sys
    import textwrap

    raw = inspect.getattr_static(owner, attr)
    func = getattr(raw, "__func__", raw)
    src = textwrap.dedent(inspect.getsource(func))
    for old, new in replacements:
        if old not in src:
            raise RuntimeError(f"cpu_patches: {owner.__name__}.{attr} no longer contains {old!r}")
        src = src.replace(old, new)
    ns: dict = {}
    exec(compile(src, f"<gptoss_model.model.cpu_patches: {owner.__qualname__}.{attr}>", "exec"),
         vars(sys.modules[owner.__module__]), ns)
    new = ns[attr]
    new = new if isinstance(new, staticmethod) or not isinstance(raw, staticmethod) else staticmethod(new)
    setattr(owner, attr, new)


_CUDA_TYPE_NAMES = [("'torch.cuda.FloatTensor'", "'torch.FloatTensor'"),
                    ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"),
                    ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'")]


def _cpu_distributed_optimizer():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _rewrite_source(DistributedOptimizer, "_build_model_and_main_param_groups", _CUDA_TYPE_NAMES)


def _cpu_clip_grads():
    """fp32 grad clipping without the CUDA type assert (scales grads in place)."""
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _expert_optimizer_tp_group():
    """The expert optimizer judges TP duplicates by the expert TP group, not the dense one."""
    from megatron.core import optimizer as mopt
    from megatron.core import parallel_state

    orig = mopt._get_megatron_optimizer_based_on_param_groups

    def build(*args, **kwargs):
        built = orig(*args, **kwargs)
        groups = kwargs.get("param_groups") or []
        if groups and all(g.get("is_expert_parallel") for g in groups):
            built.tp_group = parallel_state.get_expert_tensor_parallel_group()
        return built

    build._gptoss_orig = orig
    mopt._get_megatron_optimizer_based_on_param_groups = build


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Patch:
    name: str
    symptom: str
    reason: str
    needed: Callable[[], bool]
    applies: Callable[[], bool]  # the targeted mcore code is still there as expected
    apply: Callable[[], None]
    mcore_version: str = MCORE_VERSION


_DEVICE_MODULES = (
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.moe.router",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.utils",  # GlobalMemoryBuffer (attention matmul buffer)
)
_MASK_MODULES = ("megatron.core.transformer.utils",)
_PIPELINE_MODULES = ("megatron.core.pipeline_parallel.schedules",
                     "megatron.core.pipeline_parallel.p2p_communication")
_CHECKPOINT_MODULES = ("megatron.core.dist_checkpointing.strategies.filesystem_async",
                       "megatron.core.dist_checkpointing.strategies.state_dict_saver",
                       "megatron.core.dist_checkpointing.strategies.async_utils",
                       "megatron.core.dist_checkpointing.exchange_utils")
_OPTIMIZER_MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads",
                      "megatron.core.optimizer.distrib_optimizer",
                      "megatron.core.distributed.param_and_grad_buffer")

PATCHES: tuple[Patch, ...] = (
    Patch(
        "cuda-current-device",
        symptom='AssertionError "Torch not compiled with CUDA enabled" building yarn, the learnable '
                "softmax offset or the router, and in TP/SP gathers and reduce-scatters",
        reason="torch.cuda.current_device() is used as the allocation device; on CPU the default "
               "device (cpu, or meta for a meta build) is the right one",
        needed=_cuda_absent, applies=_cpu_torch_applies(*_DEVICE_MODULES),
        apply=_use_cpu_torch(*_DEVICE_MODULES)),
    Patch(
        "cuda-attention-masks",
        symptom="get_default_causal_mask / get_sliding_window_causal_mask fail: device='cuda'",
        reason="the masks are built with a device='cuda' literal; build them on the default device",
        needed=_cuda_absent,
        applies=lambda: _source_has(_MASK_MODULES[0], 'device="cuda"', attr="get_default_causal_mask")
        and _source_has(_MASK_MODULES[0], 'device="cuda"', attr="get_sliding_window_causal_mask"),
        apply=_use_cpu_torch(*_MASK_MODULES)),
    Patch(
        "alltoall-dispatcher-cpu",
        symptom="RuntimeError 'torch.cuda.Stream requires CUDA support' building MoE layers; with "
                "EP>1 all_to_all_single raises TypeError on tensor split sizes",
        reason="the dispatcher copies split sizes device->host on a side CUDA stream and gets "
               "numpy arrays; on CPU no stream is needed but the sizes must still become lists",
        needed=_cuda_absent,
        applies=lambda: _source_has("megatron.core.transformer.moe.token_dispatcher",
                                    "cuda_dtoh_stream = torch.cuda.Stream()",
                                    "def _maybe_dtoh_and_synchronize"),
        apply=_cpu_alltoall_dispatcher),
    Patch(
        "cpu-rng-tracker",
        symptom="model_parallel_cuda_manual_seed / rng tracker fork fail: torch.cuda.get_rng_state",
        reason="mcore keeps its TP/EP-specific RNG streams as CUDA generator states (used even with "
               "dropout 0); keep the same named, seeded streams as CPU generator states",
        needed=_cuda_absent,
        applies=lambda: _source_has("megatron.core.tensor_parallel.random", "torch.cuda.get_rng_state()",
                                    attr="CudaRNGStatesTracker"),
        apply=_cpu_rng_tracker),
    Patch(
        "no-te-router-gemm",
        symptom="NameError: te_general_gemm in moe_utils.RouterGatingLinearFunction (any device)",
        reason="moe_utils imports te_general_gemm only when TE imports, but tests `is not None` "
               "unconditionally; defining it as None selects the existing torch fallback",
        needed=_te_absent,
        applies=lambda: _source_has("megatron.core.transformer.moe.moe_utils",
                                    "if te_general_gemm is not None"),
        apply=_no_te_router_gemm),
    Patch(
        "viewless-size1-reduce",
        symptom="RuntimeError 'Output 0 of _ReduceFromModelParallelRegionBackward is a view and is "
                "being modified inplace' (mlp.py expert bias add, local spec, any device); same for "
                "the sequence-parallel reduce-scatter",
        reason="with a process group of size 1 the reduce returns its input, which autograd turns "
               "into a view; SequentialMLP then adds the expert bias in place",
        needed=_local_spec,
        applies=lambda: _source_has("megatron.core.tensor_parallel.mappings", "if group.size() == 1:\n"
                                    "        return input_", attr="_reduce")
        and _source_has("megatron.core.transformer.mlp", "output += output_bias"),
        apply=_viewless_size1_reductions),
    Patch(
        "torch-norm-sequence-parallel",
        symptom="AssertionError 'sequence parallel not supported by torch LayerNorm' building any "
                "layer with TP>1+SP on the local spec (any device without TE/Apex)",
        reason="torch's RMSNorm is fine under SP; it only lacks the `sequence_parallel` tag on its "
               "weights that makes finalize_model_grads sum their grads across TP ranks",
        needed=_local_spec,
        applies=lambda: _source_has("megatron.core.transformer.torch_norm",
                                    "assert not config.sequence_parallel", attr="WrappedTorchNorm"),
        apply=_torch_norm_sequence_parallel),
    Patch(
        "window-keeps-given-mask",
        symptom="packed (per-document) attention leaks across documents on sliding-window layers: "
                "the torch softmax path replaces a given attention mask by the window mask (no error)",
        reason="the window must be applied *in addition to* the caller's mask; OR-ing the two masks "
               "(True = masked) keeps both (full-attention layers already use the given mask)",
        needed=_local_spec,
        applies=lambda: _source_has("megatron.core.fusions.fused_softmax",
                                    "mask = get_sliding_window_causal_mask(sq, sk, self.window_size)"),
        apply=_window_keeps_given_mask),
    Patch(
        "cuda-pipeline-schedules",
        symptom="forward_backward_func fails on device='cuda' (total_num_tokens) even at PP=1; p2p "
                "shape exchange and torch.cuda.synchronize() fail at PP>1",
        reason="schedules and p2p allocate bookkeeping tensors on CUDA and sync the CUDA stream; on "
               "CPU (gloo) tensors live on CPU and ops are synchronous",
        needed=_cuda_absent, applies=_cpu_torch_applies(*_PIPELINE_MODULES),
        apply=_use_cpu_torch(*_PIPELINE_MODULES)),
    Patch(
        "cuda-optimizer",
        symptom="Megatron optimizer / DDP buffers allocate on 'cuda'; clip_grads asserts "
                "param.grad.type() == 'torch.cuda.FloatTensor'",
        reason="scalars and buffers go to the default device; clipping scales fp32 grads in place "
               "with torch._foreach_mul_ (what the multi-tensor fallback does) without the type assert",
        needed=_cuda_absent,
        applies=lambda: _cpu_torch_applies(*_OPTIMIZER_MODULES)()
        and _source_has("megatron.core.optimizer.clip_grads", "torch.cuda.FloatTensor",
                        attr="clip_grad_by_total_norm_fp32"),
        apply=lambda: (_use_cpu_torch(*_OPTIMIZER_MODULES)(), _cpu_clip_grads())),
    Patch(
        "cuda-checkpoint-preload",
        symptom="AssertionError 'Torch not compiled with CUDA enabled' in dist_checkpointing.save "
                "(torch_dist) of a training state: FileSystemWriterAsync.preload_tensors calls "
                "torch.cuda.synchronize(), the save finaliser all-reduces a flag on current_device()",
        reason="host copies are awaited with a CUDA sync and collective flags live on the CUDA "
               "device; on CPU (gloo) no sync is needed and the flags live on the CPU",
        needed=_cuda_absent, applies=_cpu_torch_applies(*_CHECKPOINT_MODULES),
        apply=_use_cpu_torch(*_CHECKPOINT_MODULES)),
    Patch(
        "cpu-distributed-optimizer",
        symptom="TypeError 'Wrapped parameters must be one of torch.cuda.FloatTensor, ...' building "
                "the distributed optimizer",
        reason="the shard builder recognises parameters by CUDA type names; the same names without "
               "'.cuda' are the CPU tensors (fp32 on CPU; 16-bit CPU training is not supported)",
        needed=_cuda_absent,
        applies=lambda: _source_has("megatron.core.optimizer.distrib_optimizer",
                                    "elif model_param.type() == 'torch.cuda.FloatTensor':"),
        apply=_cpu_distributed_optimizer),
    Patch(
        "expert-optimizer-tp-group",
        symptom="at TP>1 the TP ranks compute different grad norms, clip differently and the replicated "
                "parameters (norms, router, sinks) drift apart across TP ranks (no error; TP2+SP 1.8e-5 "
                "relative loss drift from one process by step 10 with clip_grad=1)",
        reason="get_megatron_optimizer gives the expert optimizer the dense TP group as `tp_group`, so "
               "param_is_not_tensor_parallel_duplicate drops every untagged expert parameter (each "
               "expert's linear_fc2.bias) from the norm on dense TP ranks > 0; experts are split by "
               "the expert TP group (size 1 here), whose rank 0 is every rank",
        needed=lambda: True,
        applies=lambda: _source_has("megatron.core.optimizer", "setattr(optimizer, 'tp_group', tp_group)",
                                    "tp_group = parallel_state.get_tensor_model_parallel_group()",
                                    attr="_get_megatron_optimizer_based_on_param_groups"),
        apply=_expert_optimizer_tp_group),
)

_applied: list[str] = []


def apply() -> list[str]:
    """Apply every needed patch once; return the names of all active patches."""
    import megatron.core

    if not _applied and megatron.core.__version__ != MCORE_VERSION:
        import warnings

        warnings.warn(f"cpu_patches were written for megatron-core {MCORE_VERSION}, found "
                      f"{megatron.core.__version__}; run tests/model/test_cpu_patches.py", stacklevel=2)
    for p in PATCHES:
        if p.name not in _applied and p.needed():
            p.apply()
            _applied.append(p.name)
    return list(_applied)


def check() -> dict[str, bool]:
    """Per patch: does the mcore code it targets still look as the patch expects?

    Meaningful before `apply()` (apply replaces some of the inspected code).
    """
    return {p.name: bool(p.applies()) for p in PATCHES}
