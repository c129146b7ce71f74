"""Process entry points for torch.multiprocessing tests (must be importable by spawned children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def evaluate_shard(rank: int, world_size: int, init_file: str, model_path: str, cfg_yaml: str, out_path: str) -> None:
    from omegaconf import OmegaConf

    from segtrain.config import TrainAppConfig
    from segtrain.data.loading import build_dataset, eval_loader
    from segtrain.data.normalization import normalization
    from segtrain.engine.evaluate import evaluate
    from segtrain.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainAppConfig), OmegaConf.create(cfg_yaml))
        model = build_model(cfg.model, cfg.backbone, len(cfg.dataset.class_names))
        model.load_state_dict(torch.load(model_path, weights_only=True))
        dataset = build_dataset(cfg.dataset, "val", train=False, normalize=normalization(cfg))
        loader = eval_loader(dataset, 1, 0, False)
        result = evaluate(model, loader, len(cfg.dataset.class_names), torch.device("cpu"))
        if rank == 0:
            torch.save({"matrix": result.matrix, "miou": result.metrics["miou"], "shard": len(loader.sampler)},
                       out_path)
    finally:
        dist.destroy_process_group()


def train_two_ranks(tmp_path, overrides: list[str]) -> tuple[dict, dict]:
    """The same run in one process and in two gloo processes: (one-process result, rank 0's record)."""
    import torch.multiprocessing as mp

    from conftest import compose_config
    from segtrain.engine.trainer import train

    single = train(compose_config("train", overrides), tmp_path / "single")
    run_dir = tmp_path / "ddp" / "run"
    run_dir.parent.mkdir()
    mp.spawn(train_rank, args=(2, str(tmp_path / "init"), overrides, str(run_dir), str(tmp_path / "ddp.pt")),
             nprocs=2, join=True)
    return single, torch.load(tmp_path / "ddp.pt", weights_only=True)


def train_rank(rank: int, world_size: int, init_file: str, overrides: list[str], run_dir: str, out_path: str) -> None:
    """One rank of a gloo training run; records whether the weights agree across ranks after every step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import compose_config
    from segtrain.engine.callbacks import Callback
    from segtrain.engine.trainer import train

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    agreed = []

    class CompareAcrossRanks(Callback):
        def on_step_end(self, run, result):
            flat = torch.cat([p.detach().flatten() for p in run.model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world_size)]
            dist.all_gather(gathered, flat)
            agreed.append(all(torch.equal(gathered[0], g) for g in gathered[1:]))

    try:
        # Rank 0 names the run directory; the others pass a scratch one, as the CLI does.
        mine = run_dir if rank == 0 else str(Path(run_dir).parent / f"scratch-{rank}")
        result = train(compose_config("train", overrides), Path(mine), callbacks=[CompareAcrossRanks()])
        if rank == 0:
            torch.save({"state": result.model.state_dict(), "agreed": agreed,
                        "losses": [h["loss"] for h in result.history]}, out_path)
    finally:
        dist.destroy_process_group()
