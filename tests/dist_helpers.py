"""Process entry points for torch.multiprocessing tests (must be importable by spawned children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def evaluate_shard(rank: int, world_size: int, init_file: str, model_path: str, cfg_yaml: str, out_path: str) -> None:
    from omegaconf import OmegaConf

    from segtrain.config import TrainAppConfig
    from segtrain.data.loading import build_dataset, eval_loader
    from segtrain.engine.evaluate import evaluate
    from segtrain.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainAppConfig), OmegaConf.create(cfg_yaml))
        model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
        model.load_state_dict(torch.load(model_path, weights_only=True))
        dataset = build_dataset(cfg.dataset, "val", train=False)
        loader = eval_loader(dataset, 1, 0, False)
        result = evaluate(model, loader, len(cfg.dataset.class_names), torch.device("cpu"))
        if rank == 0:
            torch.save({"matrix": result.matrix, "miou": result.metrics["miou"], "shard": len(loader.sampler)},
                       out_path)
    finally:
        dist.destroy_process_group()
