"""`AutoBridge`: the Megatron-Bridge-style front door (HF checkpoint -> distributed megatron model).

    bridge = AutoBridge.from_hf_pretrained("openai/gpt-oss-20b")
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.pipeline_model_parallel_size = 4
    provider.expert_model_parallel_size = 4
    provider.sequence_parallel = True
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False)   # list of model chunks

    bridge.export_ckpt(megatron_path="/results/run/checkpoints/iter_0000500", hf_path="./gpt-oss-hf-export")

Run it under torchrun (any world size the layout divides); without torchrun
a world of one is started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptoss_model.model.config import GptOssModelConfig
from gptoss_model.model.parallel import ParallelLayout, unwrap_model

from gptoss_model.hub.resolve import HUB_ALLOW_PATTERNS, HUB_IGNORE_PATTERNS, resolve_checkpoint  # noqa: F401 - public here too


class AutoBridge:
    def __init__(self, checkpoint_dir: Path, config: GptOssModelConfig):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config = config

    @classmethod
    def from_hf_pretrained(cls, path_or_repo: str | os.PathLike, *, revision: str | None = None) -> "AutoBridge":
        ckpt = resolve_checkpoint(path_or_repo, revision)
        return cls(ckpt, GptOssModelConfig.from_hf_config(ckpt))

    def to_megatron_provider(self, load_weights: bool = True) -> "GptOssModelProvider":
        return GptOssModelProvider(config=self.config,
                                   checkpoint_dir=self.checkpoint_dir if load_weights else None)

    def export_ckpt(self, megatron_path: str | os.PathLike, hf_path: str | os.PathLike, *,
                    weight_format: str = "bfloat16", max_shard_bytes: int | None = None,
                    base_megatron_path: str | os.PathLike | None = None, peft_adapter: bool = False,
                    show_progress: bool = True) -> dict:
        """A megatron torch_dist checkpoint (its directory, or one `iter_XXXXXXX` dir) -> a HF directory.

        Config from this bridge's model config, tokenizer files and chat template from the
        checkpoint it was made from; `weight_format` "bfloat16", "float32" or "mxfp4".
        A LoRA/DoRA training checkpoint is exported merged into its base weights; an adapter-only
        one needs `base_megatron_path` (the checkpoint the run started from). `peft_adapter`: also
        write the adapters as a PEFT directory `peft_adapter/` for the base export (DoRA: attention only).
        Same code as the export stage (`gptoss_model.export.megatron_to_hf`). Returns the export report.
        """
        from gptoss_model.export.megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, export_megatron_to_hf

        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"export {Path(hf_path).name}", unit="tensor")

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.total = total
                bar.update(done - bar.n)

        try:
            return export_megatron_to_hf(megatron_path, hf_path, config=self.config,
                                         tokenizer_dir=self.checkpoint_dir, weight_format=weight_format,
                                         max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                                         base_megatron_path=base_megatron_path, peft_adapter=peft_adapter,
                                         progress=progress)
        finally:
            if bar is not None:
                bar.close()


@dataclass
class GptOssModelProvider:
    """Settable parallel layout + dtype, then `finalize()`, then `provide_distributed_model()`."""

    config: GptOssModelConfig
    checkpoint_dir: Path | None = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    # bf16 on GPU (the recipes' precision); fp32 on CPU, where bf16 matmuls are slow
    # and parity is checked at 1e-4.
    params_dtype: torch.dtype = field(
        default_factory=lambda: torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    use_te: bool | None = None  # None: TE spec when CUDA and TE are there
    moe_token_dispatcher_type: str = "alltoall"
    seed: int = 1234
    _finalized: bool = field(default=False, repr=False)

    # --------------------------------------------------------------- set-up
    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
            sequence_parallel=self.sequence_parallel,
        )

    def build_options(self, perform_initialization: bool):
        from gptoss_model.model.build import BuildOptions

        return BuildOptions(params_dtype=self.params_dtype, use_te=self.use_te,
                            perform_initialization=perform_initialization,
                            token_dispatcher=self.moe_token_dispatcher_type)

    def finalize(self) -> None:
        """Validate the layout against the model (and the world, if already started)."""
        from gptoss_model.model.build import check_layout

        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
        check_layout(self.config, self.layout, world)
        self._finalized = True

    def initialize_model_parallel(self, seed: int | None = None) -> None:
        """Start torch.distributed (from torchrun's env) and megatron's groups for this layout."""
        from gptoss_model.model import parallel

        parallel.initialize(self.layout, seed=self.seed if seed is None else seed)

    # ------------------------------------------------------------ building
    def provide(self, pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None):
        """One model chunk for this rank (parallel state must exist), not loaded, not wrapped."""
        from gptoss_model.model.build import build_gpt_model

        return build_gpt_model(self.config, self.layout,
                               self.build_options(perform_initialization=self.checkpoint_dir is None),
                               pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)

    def provide_distributed_model(self, wrap_with_ddp: bool = True, ddp_config=None,
                                  fp16: bool | None = None, bf16: bool | None = None) -> list:
        """Build this rank's model chunks, load the HF weights into them, and wrap as asked.

        Starts torch.distributed + megatron's groups first if nobody has.
        Returns a list of chunks (one per virtual stage; one here: no interleaving).
        """
        from megatron.core import parallel_state

        from gptoss_model.checkpoint.load_hf import load_hf_weights

        if not self._finalized:
            self.finalize()
        if not parallel_state.model_parallel_is_initialized() or not self._layout_matches():
            self.initialize_model_parallel()
            self.finalize()  # again, now against the real world size
        model = self.provide()
        if self.checkpoint_dir is not None:
            load_hf_weights([model], self.checkpoint_dir, self.config)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        use_bf16 = self.params_dtype == torch.bfloat16 if bf16 is None else bf16
        if use_bf16 or fp16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        if wrap_with_ddp:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            ddp_config = ddp_config or DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
            model = DistributedDataParallel(config=unwrap_model(model).config, ddp_config=ddp_config, module=model)
        return [model]

    def _layout_matches(self) -> bool:
        from megatron.core import parallel_state as ps

        return (ps.get_tensor_model_parallel_world_size() == self.tensor_model_parallel_size
                and ps.get_pipeline_model_parallel_world_size() == self.pipeline_model_parallel_size
                and ps.get_expert_model_parallel_world_size() == self.expert_model_parallel_size
                and ps.get_expert_tensor_parallel_world_size() == self.expert_tensor_parallel_size)
