"""The zoo's model bases: the classifier head with its logit scale, gradient checkpointing that
replays the forward exactly, and timm's model API for the zoo's own staged CIFAR nets."""
# No `from __future__ import annotations` here: torch.fx copies forward()'s annotations into the code
# it generates, and TorchScript (timm's fx + torchscript test) cannot read them as strings.
import math
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models._features import (
    feature_take_indices,  # the helper every timm model's forward_intermediates uses
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.preforward import checkpoint_contexts
from ..weight_checks import state_mismatch

if TYPE_CHECKING:
    from timm.layers import SelectAdaptivePool2d

__all__ = ["ScaledHead", "StagedNet", "add_logit_scale", "checkpointed", "drop_path_rates", "kaiming_convs"]


def add_logit_scale(model: nn.Module, value: float) -> None:
    """Give ``model`` its ``logit_scale``: a fixed factor on the logits, kept as a persistent 0-dim buffer.

    Being in the state dict, the factor travels with the weights (safetensors, checkpoints, the Hub):
    loading weights sets it, so a model is never evaluated with another scale than it was trained
    with. Weights saved before the buffer existed (no ``logit_scale`` key) were trained at 1 and load
    into a model built with the default; for them the model keeps the value it was built with.
    """
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"logit_scale must be a finite positive number, got {value}")
    model.register_buffer("logit_scale", torch.tensor(value))
    model.register_load_state_dict_pre_hook(_logit_scale_if_missing)


def _logit_scale_if_missing(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    key = prefix + "logit_scale"
    if key not in state_dict:
        state_dict[key] = cast(torch.Tensor, module.logit_scale).detach().clone()


@torch.jit.ignore
def checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)`` under gradient checkpointing, its recompute in :func:`~lcnn_zoo.layers.frozen_state`
    with the values the model's pre-forward prepared for the forward: no power iteration, no BatchNorm
    statistics recorded a second time, so the recompute computes exactly the function of the forward it
    replays (and saves the same tensors)."""
    return checkpoint(stage, x, use_reentrant=False, context_fn=lambda: checkpoint_contexts(stage))


class ScaledHead:
    """The zoo's classifier head: timm's ResNet head (pool, dropout, fc), then the logit scale. A mixin
    before timm's ResNet (TorchScript cannot call ``super()``) and in the zoo's own nets."""

    if TYPE_CHECKING:  # what the host module has (declared for type checkers only: TorchScript reads annotations)
        training: bool
        drop_rate: float
        global_pool: SelectAdaptivePool2d
        fc: nn.Module
        logit_scale: torch.Tensor

    # Its entry points take folded=True (the model lcnn_zoo.fold makes), so a folded model saved by
    # timm's save_for_hf is rebuilt by its architecture name (fold records folded=True in _model_args).
    builds_folded = True

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; weights that do not fit say why in one sentence (another
        architecture, another number of input channels, other sizes) instead of torch's list of
        keys, or the layer hooks' shape errors, that timm's ``checkpoint_path=`` would show."""
        reason = state_mismatch(cast(nn.Module, self), state_dict, sizes_only=True, partial=not strict)
        if reason is not None:  # (before loading: else each layer's load hook first recomputes vectors, and warns)
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: {reason}")
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        except RuntimeError as e:
            reason = state_mismatch(cast(nn.Module, self), state_dict, partial=not strict)
            if reason is None:
                raise
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: {reason}") from e

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x) * self.logit_scale


def kaiming_convs(model: nn.Module) -> None:
    """He-normal (fan-out) initialisation of every Conv2d, as timm's ResNet initialises its own."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")



class StagedNet(ScaledHead, nn.Module):
    """timm's model API for the zoo's own CIFAR nets — a stem, ``stages``, an optional final norm,
    ``global_pool`` + ``fc`` (+ dropout) — with gradient checkpointing, ``group_matcher``,
    ``forward_intermediates`` and ``prune_intermediate_layers`` as timm's models have them.

    Gradient checkpointing recomputes each stage in :func:`~lcnn_zoo.layers.frozen_state`, so the
    recompute runs no power iteration and records no BatchNorm statistics: it computes exactly the
    function of the forward it replays.
    """

    if TYPE_CHECKING:  # set by the subclasses (declared for type checkers only: TorchScript reads annotations)
        conv1: nn.Conv2d
        stages: nn.Sequential

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   logit_scale: float) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = num_features
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.grad_checkpointing = False
        add_logit_scale(self, logit_scale)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^conv1|^bn1", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        pool = global_pool if global_pool is not None else self.global_pool.pool_type
        ref = self.conv1.weight
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool)
        for m in (self.global_pool, self.fc):
            m.to(device=ref.device, dtype=ref.dtype).train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for stage in self.stages:
                x = checkpointed(stage, x)
        else:
            x = self.stages(x)
        return self.final_norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's forward_intermediates: features after the stem (index 0) and each stage (1…)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return self.final_norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the stages ``indices`` need (timm's API); returns the indices taken."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_norm:
            self._prune_norm()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def _prune_norm(self) -> None:
        pass


def drop_path_rates(rate: float, n: int) -> List[float]:
    """Stochastic-depth rates growing linearly over the ``n`` blocks (timm's convention)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]

