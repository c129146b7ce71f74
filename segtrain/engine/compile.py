"""torch.compile of the training network: `trainer.compile=model` (the whole network as one graph) or
`trainer.compile=regions` (the backbone's blocks and the head's modules compiled one by one, in place).

Whole model (`compile_model`). The training network (the model, or its DDP wrapper) is wrapped by
torch.compile; the model itself is untouched, so validation, checkpoints and EMA see the eager module and
compile nothing. One graph: inductor fuses across block boundaries (BatchNorm + ReLU into the next
layer's input, the decoder's resizes and concatenations) and nothing leaves the graph between blocks.
Compiled at the first training step with the training crop (dynamic=False); training mode and the crop
never change, so it is never recompiled.

Regions (`RegionalCompile`). A whole-model graph of a deep CNN takes minutes to compile; a block is
small, and the many identical blocks of a stage (ResNet's bottlenecks, Xception's middle flow, HRNet's
modules) give identical graphs, which inductor's graph cache compiles once. The glue between regions
(stem convolutions, padding, feature taps, the final resize) runs eagerly.

Zero recompilations. Each region gets a code object of its own, so dynamo keeps one cache entry per
region: compiled at its first call, with the training crop, and never again (no recompile limit shared
by the blocks of one class, no guard on which block is running). Validation, on images of varying
size, runs the same modules eagerly (`eager()`), so it never compiles or recompiles anything.

Which modules are regions. In the backbone: walk the module tree through containers (Sequential,
ModuleList, ModuleDict) and single-child wrappers; every other child with parameters and submodules
is a block, and so is a container of single layers only (a conv-BN-ReLU run). A single layer on its
own (a stem conv or BatchNorm) stays eager: compiling one operator gains nothing.
Inside each block, the blocks of its own containers are regions too: they are traced into the outer
graph when the block runs compiled, and compiled on their own only when model code calls them
outside it (Xception's feature taps call a block's layers one by one). In the head: every child of the
segmentor besides the backbone that holds more than one layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("segtrain.train")

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_layer(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The blocks under `module`: through containers and single-child wrappers, down to the first
    modules that hold more than one layer."""
    children = [child for child in module.children() if _has_parameters(child)]
    # A ModuleDict or a plain module with one child is a wrapper (timm's feature wrappers, TimmBackbone).
    wrapper = len(children) == 1 and not isinstance(module, (nn.Sequential, nn.ModuleList))
    found: list[nn.Module] = []
    for child in children:
        if _is_layer(child):
            continue
        if isinstance(child, CONTAINERS) and all(_is_layer(c) for c in child.children()):
            found.append(child)  # a conv-BN-ReLU run: one block
        elif isinstance(child, CONTAINERS) or wrapper:
            found += blocks_of(child)
        else:
            found.append(child)
    return found


def model_regions(model: nn.Module) -> list[nn.Module]:
    """The modules `compile_regions` compiles, outer regions first (see the module docstring)."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        outer = blocks_of(backbone) + [child for child in model.children()
                                       if child is not backbone and _has_parameters(child) and not _is_layer(child)]
    else:
        outer = blocks_of(model)
    regions, seen = [], set()
    for region in outer + [inner for block in outer for inner in blocks_of(block)]:
        if id(region) not in seen:
            seen.add(id(region))
            regions.append(region)
    return regions


def _own_code(forward: Callable, name: str) -> Callable:
    def region(*args: object, **kwargs: object) -> object:
        return forward(*args, **kwargs)

    # dynamo caches compiled code per code object; a copy per region keeps one entry per region.
    region.__code__ = region.__code__.replace(co_name=name)
    return region


def compile_model(network: nn.Module) -> Callable:
    """`network` (the model or its DDP wrapper) compiled as one graph, for the training step only."""
    return torch.compile(network, dynamic=False)


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run every compiled function eagerly (validation: images of varying size would each compile)."""
    with torch.compiler.set_stance("force_eager"):
        yield


class RegionalCompile:
    """The compiled regions of one model; `remove()` restores the eager model, `eager()` runs it eagerly."""

    def __init__(self, model: nn.Module) -> None:
        self.regions = model_regions(model)
        for n, module in enumerate(self.regions):
            # An instance attribute shadows the class's forward; nn.Module.__call__ (hooks, DDP) is unchanged,
            # and so are the state-dict keys.
            module.forward = torch.compile(_own_code(type(module).forward.__get__(module), f"region_{n}"),
                                           dynamic=False)

    def remove(self) -> None:
        for module in self.regions:
            module.__dict__.pop("forward", None)
        self.regions = []

    eager = staticmethod(eager)
