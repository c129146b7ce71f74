"""`segtrain info`: parameter count and multiply-adds of a model, without running it on real data.

The model is built on PyTorch's meta device, so even 1024x2048 inputs take no memory or time.
Multiply-adds are counted by torch.utils.flop_counter (convolutions, transposed convolutions and
matrix products; BatchNorm, activations, pooling and interpolation are not counted); GFLOPs are
reported as 2 x GMACs.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segtrain.display import percent
from segtrain.errors import ConfigError
from segtrain.models import build_model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
    }


def model_complexity(model_cfg: DictConfig, backbone_cfg: DictConfig, num_classes: int,
                     input_size: tuple[int, int]) -> dict[str, float]:
    if len(input_size) != 2 or min(input_size) < 8:
        raise ConfigError(f"info.input_size must be [H, W] with both >= 8, got {list(input_size)}")
    # Weights do not change the counts; never download them for this.
    backbone_cfg = OmegaConf.merge(backbone_cfg, {"pretrained": False, "weights": None})
    with torch.device("meta"):
        model = build_model(model_cfg, backbone_cfg, num_classes).eval()
        image = torch.empty(1, 3, *input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    flops = counter.get_total_flops()
    return {**count_parameters(model), "gmacs": flops / 2e9, "gflops": flops / 1e9}


def training_memory(model_cfg: DictConfig, backbone_cfg: DictConfig, num_classes: int,
                    input_size: tuple[int, int], batch_size: int) -> dict[str, float]:
    """A computed estimate of training memory per process, in GiB, fp32, SGD with momentum.

    Activations: the tensors autograd saves for backward in one training forward pass at
    `batch_size` (counted on the meta device, each tensor once); weights: parameters + gradients +
    momentum (12 bytes per parameter). Not included: the CUDA context, cuDNN workspaces and
    allocator fragmentation (typically another 1-3 GiB); bf16 autocast roughly halves activations.
    """
    backbone_cfg = OmegaConf.merge(backbone_cfg, {"pretrained": False, "weights": None})
    seen: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen.setdefault(id(tensor), tensor)
        return tensor

    with torch.device("meta"):
        model = build_model(model_cfg, backbone_cfg, num_classes).train()
        image = torch.empty(batch_size, 3, *input_size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(image)
            sum(o.float().sum() for o in outputs.values())
    activations = sum(t.numel() * t.element_size() for t in seen.values() if not isinstance(t, nn.Parameter))
    weights = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"activations_gib": activations / 2**30, "weights_gib": weights / 2**30,
            "total_gib": (activations + weights) / 2**30}


def _from_checkpoint(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The checkpoint's config (model, backbone, classes) with the command line applied; one line saying what."""
    from segtrain.engine.checkpoint import inference_checkpoint, load_checkpoint, recorded_train_state
    from segtrain.engine.restore import checkpoint_config

    path = inference_checkpoint(cfg.ckpt)
    state = load_checkpoint(path)
    merged = checkpoint_config(state, cfg, overrides, str(path))
    train_state = recorded_train_state(state)
    best = train_state.get("best_miou")
    score = f", best val mIoU {percent(best)}%" if isinstance(best, float) and best >= 0 else ""
    print(f"checkpoint  {path} (iteration {train_state.get('iteration')}{score})")
    with open_dict(merged):
        merged.info = cfg.info
    return merged


def run_info(cfg: DictConfig, overrides: list[str] = ()) -> dict[str, float]:
    if cfg.get("ckpt") is not None:
        cfg = _from_checkpoint(cfg, list(overrides))
    size = tuple(int(v) for v in cfg.info.input_size)
    num_classes = len(cfg.dataset.class_names)
    stats = model_complexity(cfg.model, cfg.backbone, num_classes, size)
    model_name = cfg.model._target_.rsplit(".", 1)[-1]
    backbone_name = cfg.backbone.get("name", cfg.backbone._target_.rsplit(".", 1)[-1])
    print(f"model       {model_name} + {backbone_name} ({num_classes} classes, dataset {cfg.dataset.name})")
    print(f"parameters  {stats['params'] / 1e6:.2f}M total, {stats['trainable_params'] / 1e6:.2f}M trainable, "
          f"{stats['backbone_params'] / 1e6:.2f}M in the backbone")
    print(f"compute     {stats['gmacs']:.2f} GMACs = {stats['gflops']:.2f} GFLOPs (1 multiply-add = 2 FLOPs) "
          f"per {size[0]}x{size[1]} image")
    if cfg.info.batch_size:
        memory = training_memory(cfg.model, cfg.backbone, num_classes, size, int(cfg.info.batch_size))
        print(f"memory      ~{memory['total_gib']:.1f} GiB to train {cfg.info.batch_size} x {size[0]}x{size[1]} per "
              f"process (fp32: {memory['activations_gib']:.1f} activations + {memory['weights_gib']:.2f} weights, "
              "grads, momentum; computed, excluding CUDA context and workspaces)")
        stats.update(memory)
    return stats
