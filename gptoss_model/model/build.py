"""GptOssModelConfig -> megatron-core TransformerConfig + layer spec + GPTModel.

Every GPT-OSS feature megatron-core 0.16.1 has is switched on here, each with
the setting that reproduces transformers' GptOssForCausalLM (the reference).
The settings marked "parity" were each shown to break logits when changed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from gptoss_model.errors import PermanentError
from gptoss_model.model.config import SLIDING, GptOssModelConfig
from gptoss_model.model.parallel import ParallelLayout


class LayoutError(PermanentError, ValueError):
    """A parallel layout that cannot build this model, or would train it wrongly."""


def te_available() -> bool:
    """Transformer Engine spec only where it can actually run: CUDA + TE importable."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


# ----------------------------------------------------------------- pre-flight
def check_layout(cfg: GptOssModelConfig, layout: ParallelLayout, world_size: int | None = None) -> None:
    """Refuse layouts that cannot build or would give wrong numbers, saying why.

    The two wrong-gradient layouts of megatron-core 0.16.1 (TP>1+SP with EP=1,
    and TP>1+SP+EP>1) are not refused: `fix_expert_grad_tags` repairs them and
    the distributed gradient-parity test proves the repair.
    """
    errors = [msg for _, msg in layout_problems(cfg, layout, world_size)]
    if errors:
        raise LayoutError(f"parallel layout {_layout_str(layout)} refused for "
                          f"{cfg.num_layers}-layer GPT-OSS: " + "; ".join(errors))


def layout_problems(cfg: GptOssModelConfig, layout: ParallelLayout,
                    world_size: int | None = None) -> list[tuple[str, str]]:
    """(ParallelLayout field at fault, why) for every rule the layout breaks."""
    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.expert_tensor_parallel_size
    cp = layout.context_parallel_size
    errors: list[tuple[str, str]] = []

    def need(ok: bool, field: str, msg: str):
        if not ok:
            errors.append((field, msg))

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "expert_tensor_parallel_size", "context_parallel_size"):
        need(getattr(layout, name) >= 1, name, f"{name}={getattr(layout, name)}: parallel sizes must be >= 1")
    if errors:
        return errors
    need(etp == 1, "expert_tensor_parallel_size",
         f"expert_tensor_parallel_size={etp}: GPT-OSS experts have biases, "
         "which megatron-core only supports with expert tensor parallel size 1")
    need(cp == 1, "context_parallel_size", "context parallel is not supported here "
         "(learnable softmax sinks need the a2a CP path and Transformer Engine)")
    need(cfg.num_key_value_heads % tp == 0, "tensor_model_parallel_size",
         f"TP={tp} must divide num_key_value_heads={cfg.num_key_value_heads} (QKV is split per query group)")
    need(cfg.num_attention_heads % tp == 0, "tensor_model_parallel_size",
         f"TP={tp} must divide num_attention_heads={cfg.num_attention_heads}")
    need(cfg.vocab_size % tp == 0, "tensor_model_parallel_size",
         f"TP={tp} must divide vocab_size={cfg.vocab_size} (no vocab padding)")
    need(cfg.num_experts % ep == 0, "expert_model_parallel_size",
         f"EP={ep} must divide num_experts={cfg.num_experts}")
    need(cfg.num_layers % pp == 0, "pipeline_model_parallel_size",
         f"PP={pp} must divide num_layers={cfg.num_layers}")
    # megatron-core refuses MoE + TP without SP when training; say it up front, with the fix.
    need(tp == 1 or layout.sequence_parallel, "sequence_parallel",
         f"TP={tp} with an MoE model needs sequence_parallel=True (megatron-core 0.16.1 "
         "refuses MoE+TP without SP for training)")
    if world_size is not None:
        mp = tp * pp * cp
        need(world_size % mp == 0, "tensor_model_parallel_size",
             f"world size {world_size} not divisible by TP*PP*CP={mp}")
        need(world_size % (etp * ep * pp) == 0, "expert_model_parallel_size",
             f"world size {world_size} not divisible by ETP*EP*PP={etp * ep * pp}")
    return errors


def _layout_str(layout: ParallelLayout) -> str:
    sp = "+SP" if layout.sequence_parallel else ""
    return (f"TP={layout.tp}{sp} PP={layout.pp} EP={layout.ep} "
            f"ETP={layout.expert_tensor_parallel_size}")


# ---------------------------------------------------------- TransformerConfig
def quick_gelu_eager(x: torch.Tensor) -> torch.Tensor:
    """megatron-core's quick_gelu without its torch.compile wrapper (same math).

    On CPU the compiled one costs seconds of inductor compilation per process,
    recompiles as per-expert token counts change, and needs a C compiler. The
    fused GPU path (bias_activation_fusion) recognises only mcore's own
    function, so GPU builds keep that one.
    """
    return x * torch.sigmoid(1.702 * x)


@dataclass(frozen=True)
class BuildOptions:
    params_dtype: torch.dtype = torch.float32
    use_te: bool | None = None  # None: te_available()
    perform_initialization: bool = True
    token_dispatcher: str = "alltoall"  # "allgather" also works, incl. on CPU
    router_dtype: str | None = None  # None = model dtype, like the reference
    # Where the parameters live: None = on the GPU when CUDA is available. False builds a
    # CPU (or meta) model on a CUDA machine too: CPU initialisation, no fused kernels.
    on_gpu: bool | None = None


def transformer_config(cfg: GptOssModelConfig, layout: ParallelLayout, opts: BuildOptions = BuildOptions()):
    from megatron.core.activations import quick_gelu
    from megatron.core.transformer.transformer_config import TransformerConfig

    use_te = te_available() if opts.use_te is None else opts.use_te
    on_gpu = torch.cuda.is_available() if opts.on_gpu is None else opts.on_gpu
    tc = TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        moe_ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        # Sinks: HF `self_attn.sinks` is megatron's learnable softmax offset.
        softmax_type="learnable",
        # parity: HF sliding_window=W means W keys including the query itself,
        # i.e. W-1 to the left; (W, 0) is off by one.
        window_size=(cfg.sliding_window - 1, 0),
        # One flag per layer (1 = windowed), so any HF layer_types pattern maps exactly.
        window_attn_skip_freq=[1 if t == SLIDING else 0 for t in cfg.layer_types],
        # Clamped quick-gelu GLU with the +1 on the linear half: GPT-OSS's swiglu.
        gated_linear_unit=True,
        activation_func=quick_gelu if on_gpu else quick_gelu_eager,
        glu_linear_offset=1.0,
        activation_func_clamp_value=cfg.swiglu_limit,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.experts_per_token,
        # parity: top-k first, then softmax over the k chosen logits.
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype=opts.router_dtype,
        moe_token_dispatcher_type=opts.token_dispatcher,
        moe_grouped_gemm=use_te,
        moe_permute_fusion=on_gpu and use_te,  # TE's fused permute kernels
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        pipeline_dtype=opts.params_dtype,
        # Without CUDA there is no device to initialise on; with it, init on GPU.
        use_cpu_initialization=not on_gpu,
        perform_initialization=opts.perform_initialization,
        # Fused kernels exist only with CUDA (and TE/Apex for some).
        bias_activation_fusion=on_gpu and use_te,
        masked_softmax_fusion=on_gpu and use_te,
        apply_rope_fusion=on_gpu and use_te,
        gradient_accumulation_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
    )
    # parity: yarn. In megatron-core 0.16.1 these are not TransformerConfig
    # fields; GPTModel reads them with getattr, so they go on the object.
    tc.yarn_rotary_scaling_factor = cfg.rope_factor
    tc.yarn_original_max_position_embeddings = cfg.rope_original_max_position_embeddings
    tc.yarn_beta_fast = cfg.rope_beta_fast
    tc.yarn_beta_slow = cfg.rope_beta_slow
    tc.yarn_mscale = None
    tc.yarn_mscale_all_dim = None
    # parity: HF yarn `truncate=False` = do not round the correction range
    # (megatron's default True gives a 0.67 logit error).
    tc.yarn_correction_range_round_to_int = cfg.rope_truncate
    return tc


def layer_spec(tc, use_te: bool):
    """TE spec with grouped GEMM on GPU; local spec with SequentialMLP elsewhere."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=tc.num_moe_experts, moe_grouped_gemm=True)
    return get_gpt_layer_local_spec(
        num_experts=tc.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm")


# ------------------------------------------------------------------ GPTModel
def build_gpt_model(cfg: GptOssModelConfig, layout: ParallelLayout, opts: BuildOptions = BuildOptions(),
                    *, pre_process: bool | None = None, post_process: bool | None = None,
                    vp_stage: int | None = None):
    """One model chunk for this rank's pipeline stage (parallel_state must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from gptoss_model.model import cpu_patches

    cpu_patches.apply()
    check_layout(cfg, layout, torch.distributed.get_world_size() if torch.distributed.is_initialized() else None)
    use_te = te_available() if opts.use_te is None else opts.use_te
    tc = transformer_config(cfg, layout, opts)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=tc,
        transformer_layer_spec=layer_spec(tc, use_te),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="yarn",
        rotary_base=int(cfg.rope_theta),
        vp_stage=vp_stage,
    )
    fix_expert_grad_tags(model, layout)
    tag_tensor_parallel_params(model)
    return model


def tag_tensor_parallel_params(model: torch.nn.Module) -> list[str]:
    """Mark every TP-split parameter as such (megatron-core 0.16.1 leaves some untagged).

    The grad norm (hence clipping) counts an untagged parameter only on TP rank 0,
    as if it were replicated, so at TP>1 the norm comes out too small and clipping
    differs from TP=1 (measured: 1.55 vs 1.88 on the tiny model). Untagged are
    (a) the weights of column/row-parallel linears and the vocab-parallel
    embedding when built with perform_initialization=False (the tags are set only
    inside the init functions; every checkpoint-loaded model is built that way), and
    (b) the learnable softmax offset (sinks), split per head across TP but never tagged.
    Returns the names of parameters tagged here.
    """
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding,
                                                      set_tensor_model_parallel_attributes)
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    tagged = []
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            param, dim = module.weight, 0
        elif isinstance(module, RowParallelLinear):
            param, dim = module.weight, 1
        elif isinstance(module, DotProductAttention) and isinstance(module.softmax_offset, torch.nn.Parameter):
            param, dim = module.softmax_offset, 0
        else:
            continue
        if param is None or getattr(param, "tensor_model_parallel", False):
            continue
        set_tensor_model_parallel_attributes(param, True, dim, getattr(module, "stride", 1))
        tagged.append(name)
    return tagged


def fix_expert_grad_tags(model: torch.nn.Module, layout: ParallelLayout) -> list[str]:
    """Repair megatron-core 0.16.1's gradient bookkeeping of expert parameters.

    1. TP>1 + SP + EP>1: each expert's `linear_fc2.bias` is tagged
       `sequence_parallel`, so finalize_model_grads all-reduces it across TP
       ranks that hold *different* experts (silently wrong grads). Experts do
       their own token exchange; no expert parameter is sequence-parallel.
    2. TP>1 + SP + EP=1: experts are replicated on the TP ranks, each of which
       sees a different part of the sequence, but megatron treats them as
       expert-parallel only when EP>1 (`allreduce` attr), so their grads are
       never summed across TP. Marking them expert params (allreduce=False)
       makes DDP reduce them over the expert-data-parallel group, which with
       ETP=1 spans the TP ranks. Grad-norm and optimizer groups follow the tag.
    Returns the names of parameters touched (for logs/tests).
    """
    touched = []
    for name, p in model.named_parameters():
        if ".mlp.experts." not in name:
            continue
        changed = False
        if getattr(p, "sequence_parallel", False):
            p.sequence_parallel = False
            changed = True
        if layout.tp > 1 and layout.ep == 1 and getattr(p, "allreduce", True):
            p.allreduce = False
            changed = True
        if changed:
            touched.append(name)
    return touched


# ------------------------------------------------------------------- counting
def count_parameters(model: torch.nn.Module, cfg: GptOssModelConfig) -> dict[str, int]:
    """Total and active parameters of one (unsharded) model.

    Active = what one token touches: everything except the input embedding
    (a lookup, not a matmul) with only top-k of the E experts.
    """
    total = expert = embedding = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if ".mlp.experts." in name:
            expert += n
        elif name.startswith("embedding."):
            embedding += n
    active = total - embedding - expert + expert * cfg.experts_per_token // cfg.num_experts
    return {"total": total, "active": active, "experts": expert, "embedding": embedding}
