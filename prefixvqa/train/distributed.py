"""Many processes, one adapter format: the strategy-specific parts of the training loop.

The trainer calls these helpers instead of branching on the launcher; everything else in the loop is the same for
one process, `torchrun`/`accelerate launch` DDP, FSDP and DeepSpeed.

* ddp: accelerate wraps the model in DistributedDataParallel (NCCL on GPUs, gloo on CPUs).
* fsdp: torch's FSDP2 `fully_shard` (full shard): one unit per decoder layer (the decoder's `_no_split_modules`)
  plus the root; works with gloo on CPU too (accelerate's own FSDP path needs GPUs). Saving gathers the full
  tensors (`DTensor.full_tensor`), optimizer state goes through torch.distributed.checkpoint's full state dicts.
* deepspeed: accelerate's DeepSpeed integration with a ZeRO-2/3 JSON (recipes/launch/); on CPU with DeepSpeed's
  CPU accelerator (DS_ACCELERATOR=cpu) over gloo, which the tests use. DeepSpeed keeps its
  optimizer state partitioned and writes it with torch.save (pickle), which this project never writes, so a
  DeepSpeed run saves adapters (weights gathered to rank 0) and refuses trainer-state resume with a message.

Only rank 0 writes; every rank joins the gathers. A checkpoint records its world size and the layout of its global
batches; a run may resume at another world size (DDP, FSDP): the global batches stay the original run's and the
accumulation adapts (`sampling.py`), the optimizer state is whole in the checkpoint (FSDP: a full state dict keyed by
parameter name, re-sharded over the new ranks), and the per-rank random streams are reseeded.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import ConfigError
from .config import STRATEGIES, TrainConfig

__all__ = ["STRATEGIES", "Distributed", "strategy_of", "deepspeed_file", "deepspeed_stage"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def deepspeed_file(cfg: TrainConfig) -> str | None:
    """The DeepSpeed JSON: train.deepspeed_config, else the one `accelerate launch --config_file` names."""
    return cfg.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None


def deepspeed_stage(cfg: TrainConfig) -> int:
    """ZeRO stage of the run's DeepSpeed config (file), or of `accelerate launch`'s environment."""
    if deepspeed_file(cfg):
        path = Path(deepspeed_file(cfg))
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config: {path} not found")
        try:
            return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ConfigError(f"train.deepspeed_config {path}: {exc}") from None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def strategy_of(cfg: TrainConfig) -> str:
    """'ddp', 'fsdp', or 'zero1'/'zero2'/'zero3' for this run. `auto` follows `accelerate launch --config_file`
    (its ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED environment), else DDP."""
    name = cfg.distributed
    if name == "auto":
        name = "fsdp" if _flag("ACCELERATE_USE_FSDP") else "deepspeed" if _flag("ACCELERATE_USE_DEEPSPEED") else "ddp"
    if name == "deepspeed":
        return f"zero{deepspeed_stage(cfg)}"
    return name


def _fsdp_modules(model: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's full value (a collective: every rank calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class Distributed:
    """The run's strategy: how to launch accelerate, wrap the model, step, gather and restore."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.strategy = strategy_of(cfg)
        self.deepspeed = self.strategy.startswith("zero")
        self.fsdp = self.strategy == "fsdp"

    # --- setup ----------------------------------------------------------------------------------------------------
    def accelerator_kwargs(self) -> dict[str, Any]:
        """Extra Accelerator arguments. FSDP is applied here (torch's fully_shard), not by accelerate, so its
        launcher flag is consumed; DeepSpeed goes through accelerate's plugin."""
        if self.fsdp:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
            return {}
        if not self.deepspeed:
            return {}
        on_cpu = not torch.cuda.is_available()
        if on_cpu and os.environ.get("DS_ACCELERATOR") != "cpu":
            raise ConfigError("train.distributed=deepspeed needs CUDA GPUs, or DeepSpeed's CPU accelerator with gloo "
                              "(export DS_ACCELERATOR=cpu); on CPU ddp and fsdp work too")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ImportError("train.distributed=deepspeed needs DeepSpeed: pip install 'prefixvqa[deepspeed]'") \
                from None
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        kwargs: dict[str, Any] = {"gradient_accumulation_steps": self.cfg.grad_accum}
        if self.cfg.max_grad_norm is not None:
            kwargs["gradient_clipping"] = self.cfg.max_grad_norm
        file = deepspeed_file(self.cfg)
        plugin = DeepSpeedPlugin(hf_ds_config=file, **kwargs) if file else \
            DeepSpeedPlugin(zero_stage=int(self.strategy[-1]), **kwargs)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.cfg.batch_size  # no dataloader is prepared
        plugin.set_mixed_precision(self.cfg.mixed_precision)  # the Accelerator's own is "no" (see precision.py)
        out: dict[str, Any] = {"deepspeed_plugin": plugin, "gradient_accumulation_steps": self.cfg.grad_accum}
        if on_cpu:  # accelerate enables DeepSpeed only off its cpu flag; naming gloo makes it count the ranks
            out.update(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        return out

    def check(self, model: nn.Module, world: int) -> None:
        """Refuse combinations the strategy cannot run, each with what to use instead."""
        method, quant = model.config.tuning.method, model.config.decoder.quantization
        if (self.fsdp or self.strategy == "zero3") and quant:
            raise ConfigError(f"train.distributed={self.cfg.distributed} ({self.strategy}) cannot shard a "
                              f"bitsandbytes {quant} decoder; QLoRA's trained tensors are small: use ddp")
        if self.fsdp and not method.shardable:
            raise ConfigError(f"tuning.mode={method.name!r} with fsdp is not supported (soft prompts are tiny): use "
                              "ddp")
        if self.fsdp and self.cfg.mixed_precision == "fp16":
            raise ConfigError("fsdp with fp16 loss scaling is not supported (scales are per rank); use bf16 or ddp")
        if self.fsdp and world < 2 and not torch.distributed.is_initialized():
            raise ConfigError("train.distributed=fsdp needs several processes or a launcher's process group: launch "
                              "with torchrun or accelerate launch (torchrun --nproc_per_node=1 for one process, e.g. "
                              "to resume a sharded run), or train unsharded with ddp/auto")

    def shard(self, acc: Any, model: nn.Module) -> nn.Module:
        """FSDP: torch's fully_shard on each decoder layer (the decoder's `_no_split_modules`) and on the root, in
        place (the parameters become DTensor shards, so the optimizer is built afterwards). Others: unchanged."""
        if not self.fsdp:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model.to(acc.device)
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        decoder = model.decoder.get_base_model() if hasattr(model.decoder, "get_base_model") else model.decoder
        units = set(getattr(decoder, "_no_split_modules", None) or [])
        for module in list(model.decoder.modules()):
            if type(module).__name__ in units:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def prepare(self, acc: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """accelerate wraps the model (DDP, DeepSpeed engine) and the optimizer; a sharded model is left as it is."""
        if self.fsdp:
            return model, acc.prepare(optimizer)
        return acc.prepare(model, optimizer)

    # --- the step -------------------------------------------------------------------------------------------------
    def no_sync(self, acc: Any, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on accumulation micro-steps."""
        if self.fsdp:
            for m in _fsdp_modules(model):
                m.set_requires_gradient_sync(sync, recurse=False)
            return contextlib.nullcontext()
        if self.deepspeed:
            acc.gradient_state._set_sync_gradients(sync)  # DeepSpeed steps its engine on the boundary itself
            return contextlib.nullcontext()
        return acc.no_sync(model) if not sync and acc.num_processes > 1 else contextlib.nullcontext()

    def backward(self, acc: Any, loss: torch.Tensor, grad_accum: int) -> None:
        """Backward of one micro-batch's share of the step's loss (DeepSpeed divides by its
        gradient_accumulation_steps itself: accelerate hands it the raw loss)."""
        acc.backward(loss if self.deepspeed else loss / grad_accum)

    def clip_grad_norm(self, acc: Any, params: list[nn.Parameter], max_norm: float) -> float | None:
        """Clip and return the total norm; None under DeepSpeed, which clips inside its step (gradient_clipping)."""
        if self.deepspeed:
            return None
        if self.fsdp:
            return float(_full(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        return float(acc.clip_grad_norm_(params, max_norm))

    @contextlib.contextmanager
    def full_params(self, model: nn.Module) -> Iterator[None]:
        """Every rank holds the full weights (evaluation, generation: ranks run different numbers of forwards, so
        no per-layer gathers may happen in between)."""
        if self.fsdp:
            modules = _fsdp_modules(model)
            for m in modules:
                m.unshard()
                m.set_reshard_after_forward(False, recurse=False)
            try:
                yield
            finally:
                for m in modules:
                    m.set_reshard_after_forward(True, recurse=False)
                    m.reshard()
        elif self.strategy == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                yield
        else:
            yield

    # --- saving and restoring ----------------------------------------------------------------------------------
    def gathered_state(self, acc: Any, wrapped: nn.Module, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Full tensors of what an adapter folder stores, on rank 0, for a sharded run (every rank must call this);
        None when the live tensors are already whole (one process, DDP, ZeRO-1/2)."""
        if self.deepspeed:
            return acc.get_state_dict(wrapped) if self.strategy == "zero3" else None
        if not self.fsdp:
            return None
        from ..adapter_io import PART_PREFIX, stored_parts
        from ..decoder import is_peft_param

        prefixes = tuple(PART_PREFIX[p] for p in stored_parts(model))
        method = model.config.tuning.method
        peft = method.uses_peft_files and not method.soft_prompt  # weight-space peft tensors live in the layers
        bias = model.config.tuning.bias != "none"
        out = {}
        for name, value in model.state_dict().items():  # the same order on every rank
            wanted = name.startswith(prefixes) or (peft and name.startswith("decoder.") and
                                                   (is_peft_param(name) or (bias and name.endswith(".bias"))))
            if wanted:
                full = _full(value)
                if acc.is_main_process:
                    out[name] = full.detach().cpu()
        return out

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
        """The optimizer's full state (every rank must call this); None under DeepSpeed (see the module doc)."""
        if self.deepspeed:
            return None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_optimizer(self, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
        """Put back a full optimizer state (FSDP re-shards it over this run's ranks; others load it as it is)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    def check_resume(self, state: dict[str, Any], world: int, folder: Path) -> None:
        """Refuse a resume that cannot be exact, saying what would work."""
        if self.deepspeed:
            raise ConfigError(f"resume from {folder}: trainer-state resume under DeepSpeed is not supported (its "
                              "optimizer state is partitioned and saved with torch.save/pickle, which this project "
                              "does not write); start a new run from the adapter (model.adapter: that folder)")
        # another world size: the global batches are checked by sampling.BatchPlan.for_run
        saved = state.get("strategy", "ddp")
        if (saved == "fsdp") != self.fsdp:
            raise ConfigError(f"resume from {folder}: the checkpoint was written under {saved}, this run uses "
                              f"{self.strategy}; resume with train.distributed={saved}")
