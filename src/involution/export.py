"""Exporting models that contain involutions: ONNX and ``torch.export`` programs.

Exported graphs hold standard operators only: an ONNX file runs in any ONNX runtime without a
custom domain, and a saved ``ExportedProgram`` loads without importing this library. Both keep
the batch size and the spatial size dynamic. Each involution becomes a Gather and a batched
MatMul (``ops/export_graph.py``), reached two ways:

* :func:`export_program`: while ``torch.export`` traces the model, :mod:`involution.functional`
  computes involution with standard ATen operations;
* :func:`export_onnx`: each involution is traced as its registered op, one opaque node with a
  fake implementation, and the ONNX exporter translates it with a table from
  ``ops/export_graph.py``. Tracing skips the symbolic shape arithmetic of a dozen operations per
  layer on dynamic sizes, which made most of the export time.

The exporters' own log messages and warnings (one line per constant the ONNX optimizer merges,
notes about optional packages, deprecations inside PyTorch) are hidden unless ``verbose=True``.

Each exporter is paired with a check that runs the exported model next to the PyTorch one and
returns the largest absolute difference of their outputs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.overrides import TorchFunctionMode

from .ops import export_graph

__all__ = [
    "STANDARD_ONNX_DOMAINS",
    "export_onnx",
    "export_program",
    "nonstandard_onnx_domains",
    "onnx_max_abs_diff",
    "onnx_op_counts",
    "program_max_abs_diff",
]

logger = logging.getLogger(__name__)

# The default ONNX operator set has two spellings of its domain.
STANDARD_ONNX_DOMAINS = frozenset({"", "ai.onnx"})
INPUT_NAME = "images"
OUTPUT_NAME = "output"
# Loggers of the exporters and of the ONNX optimizer, hidden below ERROR unless verbose.
_EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _exporter_output(verbose: bool) -> Iterator[None]:
    """Hides the exporters' log records below ERROR and their warnings, unless ``verbose``."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _trace_input(example: torch.Tensor) -> tuple[torch.Tensor, tuple[dict[int, Any]]]:
    """The example to trace with and its dynamic dimensions."""
    if example.dim() != 4:
        raise ValueError(
            f"example input must be (batch, channels, height, width), got {tuple(example.shape)}"
        )
    if example.shape[0] == 1:
        # torch.export specializes a size of 1 to a constant; two images keep the batch dynamic.
        example = example.repeat(2, 1, 1, 1)
    # Batch from 1 up; the spatial range is the one the model's layers allow (inferred).
    return example, ({0: Dim("batch", min=1), 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},)


class _Consumers(TorchFunctionMode):
    """Counts the tensor-returning calls that take each watched tensor as an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}  # kept alive: no later tensor takes the id
        self.uses: collections.Counter[int] = collections.Counter()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor):  # not the size or dtype queries
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and self.watched.get(id(leaf)) is leaf:
                    self.uses[id(leaf)] += 1
        return result


def _fold_batch_norms(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with each eval-mode BatchNorm folded into the convolution whose
    output it alone takes (see :func:`export_onnx`), or ``model`` itself where nothing folds.

    One forward on ``example`` finds the pairs: a convolution called once whose output, not
    changed in place, is taken by one BatchNorm called once and by no other operation. The
    folded copy is then checked against the model on ``example``. A model with a module in
    training mode is left alone (the forward would update its statistics), as is one that
    does not return a tensor; anything that fails on the way returns the model unfolded.
    """
    if any(module.training for module in model.modules()):
        return model
    calls: collections.Counter[str] = collections.Counter()
    made_by: dict[int, tuple[str, int]] = {}  # id of a convolution's output -> (name, version)
    pairs: dict[str, tuple[str, int]] = {}  # BatchNorm -> (convolution, id of its output)
    consumers = _Consumers()

    def conv_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                made_by[id(output)] = (name, output._version)
                consumers.watched[id(output)] = output

        return hook

    def norm_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] += 1
            input = args[0] if args else None
            made = made_by.get(id(input))
            fresh = made is not None and made[1] == input._version  # type: ignore[union-attr]
            if fresh and consumers.watched.get(id(input)) is input:
                pairs[name] = (made[0], id(input))  # type: ignore[index]

        return hook

    modules = dict(model.named_modules())
    hooks = []
    for name, module in modules.items():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif (
            isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None
        ):
            hooks.append(module.register_forward_pre_hook(norm_hook(name)))
    try:
        with torch.no_grad(), consumers:
            expected = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    folds = {
        bn: conv
        for bn, (conv, output) in pairs.items()
        if calls[bn] == 1 and calls[conv] == 1 and consumers.uses[output] == 1
    }
    if not folds or not isinstance(expected, torch.Tensor):
        return model
    try:
        folded = copy.deepcopy(model)
        copies = dict(folded.named_modules())
        for bn, conv in folds.items():
            folded.set_submodule(conv, torch.nn.utils.fuse_conv_bn_eval(copies[conv], copies[bn]))
            folded.set_submodule(bn, nn.Identity())
        with torch.no_grad():
            got = folded(example)
        scale = expected.abs().max().item()
        same = torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0))
    except Exception as error:  # the export goes on unfolded; -v shows why
        logger.debug("BatchNorm folding failed (%s); exporting unfolded", error)
        return model
    if not same:
        logger.debug("BatchNorm folding changed the output; exporting unfolded")
        return model
    logger.debug("folded %d BatchNorms into convolutions", len(folds))
    return folded


def _max_abs_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        raise RuntimeError(
            f"exported model returned shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}"
        )
    return (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0


def _check_inputs(inputs: Sequence[torch.Tensor]) -> None:
    if not inputs:
        raise ValueError("inputs must hold at least one tensor to compare outputs on")


def export_program(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    verbose: bool = False,
) -> torch.export.ExportedProgram:
    """Exports ``model`` with ``torch.export`` and saves the program to ``path``.

    Args:
        model: in eval mode; it takes one (B, C, H, W) tensor.
        path: file to write (``.pt2`` by convention).
        example: an input to trace with; batch, height and width stay dynamic.
        verbose: show the exporter's log messages and warnings.

    Returns:
        The exported program, as saved.
    """
    example, dynamic_shapes = _trace_input(example)
    with _exporter_output(verbose):
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
        torch.export.save(program, path)
    logger.debug("saved the exported program to %s", path)
    return program


def program_max_abs_diff(
    path: str | os.PathLike[str], model: nn.Module, inputs: Sequence[torch.Tensor]
) -> float:
    """Loads the program saved at ``path`` and compares it with ``model`` on each input.

    Returns:
        The largest absolute difference of the outputs over all inputs.
    """
    _check_inputs(inputs)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        return max(_max_abs_diff(loaded(x), model(x)) for x in inputs)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example: torch.Tensor,
    opset: int = 18,
    verbose: bool = False,
) -> Path:
    """Exports ``model`` to ONNX with the dynamo-based exporter of ``torch.onnx``.

    The graph has one input ``images`` and one output ``output``, with dynamic batch, height
    and width, and standard ONNX operators only (checked after writing). Each involution is
    traced as one node and translated to ONNX directly (``export_graph.onnx_translation``).

    A BatchNorm in eval mode that is the only consumer of a convolution's output is folded into
    that convolution's weight and bias (in a copy; ``model`` is left as it is), as the ONNX
    optimizer and runtimes do anyway: the exporter then traces a third fewer operations in a
    ResNet-like network. The pairs are found in one forward on ``example`` and the copy is
    checked against the model on it; where anything does not fit, the model is exported as it
    is (see ``_fold_batch_norms``).

    Args:
        model: in eval mode; it takes one (B, C, H, W) tensor.
        path: file to write.
        example: an input to trace with.
        opset: ONNX operator set version.
        verbose: show the exporter's log messages and warnings.

    Returns:
        ``path``.

    Raises:
        ImportError: the ``onnx`` or ``onnxscript`` package is missing (``involution[export]``).
        RuntimeError: the written graph uses an operator outside the standard domains.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx and onnxscript ({error}): pip install 'involution[export]'"
        ) from error
    path = Path(path)
    example, dynamic_shapes = _trace_input(example)
    model = _fold_batch_norms(model, example)
    with _exporter_output(verbose), export_graph.onnx_translation() as translation:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            external_data=False,
            custom_translation_table=translation,
            verbose=verbose,
        )
    custom = nonstandard_onnx_domains(path)
    if custom:
        raise RuntimeError(f"{path} uses operators of non-standard domains {sorted(custom)}")
    logger.debug("wrote %s (opset %d)", path, opset)
    return path


def _nodes(graph: Any) -> Iterator[Any]:
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _nodes(subgraph)


def nonstandard_onnx_domains(path: str | os.PathLike[str]) -> set[str]:
    """Operator domains of the ONNX file at ``path`` outside ``STANDARD_ONNX_DOMAINS``.

    Looks at every node, in subgraphs (If, Loop) and local functions too, and at the declared
    operator sets.
    """
    import onnx

    proto = onnx.load(str(path))
    domains = {node.domain for node in _nodes(proto.graph)}
    for function in proto.functions:
        domains.add(function.domain)
        domains.update(node.domain for node in function.node)
    domains.update(opset.domain for opset in proto.opset_import)
    return domains - STANDARD_ONNX_DOMAINS


def onnx_op_counts(path: str | os.PathLike[str]) -> collections.Counter[str]:
    """How many nodes of each operator type the ONNX file at ``path`` holds (subgraphs too)."""
    import onnx

    return collections.Counter(node.op_type for node in _nodes(onnx.load(str(path)).graph))


def onnx_max_abs_diff(
    path: str | os.PathLike[str], model: nn.Module, inputs: Sequence[torch.Tensor]
) -> float:
    """Runs the ONNX file at ``path`` with onnxruntime (CPU) and ``model`` on each input.

    Returns:
        The largest absolute difference of the outputs over all inputs.

    Raises:
        ImportError: onnxruntime is missing (``involution[export]``).
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "checking ONNX needs onnxruntime: pip install 'involution[export]'"
        ) from error
    _check_inputs(inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = []
    for x in inputs:
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().numpy()})
        with torch.no_grad():
            expected = model(x).cpu()
        diffs.append(_max_abs_diff(torch.from_numpy(got), expected))
    return max(diffs)
