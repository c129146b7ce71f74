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


class HostReads:
    """Counts the reads of tensor values back to the host (what synchronises with a GPU): every
    aten::_local_scalar_dense (Tensor.item, bool(), float(), tolist, and ATen's own, e.g. indexing with a
    0-dim tensor) and aten::nonzero (boolean-mask indexing sizes its result on the host)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.count, self.paused = 0, False
        syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in syncing and not counter.paused:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def count_reads_per_iteration(cfg, run_dir, poison_at: int = 0) -> tuple[dict[int, int], object]:
    """Train `cfg`, counting host reads per iteration (the loader's own host-side tensors left out);
    `poison_at`: that iteration's images are NaN. Returns ({iteration: reads}, TrainResult)."""
    from pathlib import Path

    from segtrain.engine.callbacks import Callback
    from segtrain.engine.trainer import Trainer

    reads, per_iteration = HostReads(), {}

    class Tally(Callback):  # the last callback: it sees every read of the iteration's step and events
        def on_fit_start(self, run):
            reads.take()

        def on_iteration_end(self, run):
            per_iteration[run.state.iteration] = reads.take()

    class CountingTrainer(Trainer):
        def next_batches(self, data):
            reads.paused = True  # the sampler's host-side index tensors are no device reads
            try:
                batches = super().next_batches(data)
            finally:
                reads.paused = False
            if self.run.state.iteration + 1 == poison_at:
                # Float images are used as normalised already: NaN reaches the network as it is.
                batches = [(torch.full(images.shape, float("nan")), masks) for images, masks in batches]
            return batches

    trainer = CountingTrainer(cfg, Path(run_dir), callbacks=[Tally()])
    try:
        trainer.setup()
        with reads.mode:
            result = trainer.fit()
    finally:
        trainer.close()
    return per_iteration, result


def count_reads_rank(rank: int, world_size: int, init_file: str, overrides: list[str], run_dir: str,
                     out_path: str) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import compose_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mine = run_dir if rank == 0 else str(Path(run_dir).parent / f"scratch-{rank}")
        per_iteration, _ = count_reads_per_iteration(compose_config("train", overrides), mine)
        torch.save(per_iteration, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def preempt_rank(rank: int, world_size: int, init_file: str, overrides: list[str], run_dir: str, out_path: str) -> None:
    """Rank 1 alone receives SIGTERM during iteration 3; records where this rank stopped and how."""
    import os
    import signal
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import compose_config
    from segtrain.engine.callbacks import Callback
    from segtrain.engine.trainer import train
    from segtrain.errors import Preempted

    class SignalRankOne(Callback):
        def on_step_end(self, run, result):
            if rank == 1 and run.state.iteration == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    stopped: dict = {"preempted": False}
    try:
        mine = run_dir if rank == 0 else str(Path(run_dir).parent / f"scratch-{rank}")
        try:
            train(compose_config("train", overrides), Path(mine), callbacks=[SignalRankOne()])
        except Preempted as exc:
            stopped = {"preempted": True, "message": str(exc), "exit_code": exc.exit_code}
        torch.save(stopped, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()
