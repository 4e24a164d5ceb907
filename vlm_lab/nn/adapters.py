"""Connectors between modalities: linear projector, MLP projector, bottleneck adapter.

- ``LinearProjector``: one matrix (CLIP's projections, BLIP-2's Q-Former -> LLM, LLaVA v1).
- ``MLPProjector``: Linear -> GELU -> Linear (LLaVA-1.5's ``mlp2x_gelu``; HF ``LlavaMultiModalProjector``).
- ``Adapter``: a residual bottleneck (Houlsby et al., 2019): x + up(act(down(x))), the up-projection
  initialised to zero so an inserted adapter starts as the identity.
"""

from __future__ import annotations

from torch import Tensor, nn

from .blocks import get_activation


class LinearProjector(nn.Module):
    """``(..., in_dim) -> (..., out_dim)`` by one linear map."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class MLPProjector(nn.Module):
    """``(..., in_dim) -> (..., out_dim)``: Linear -> act -> Linear (hidden width defaults to ``out_dim``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, act: str = "gelu") -> None:
        super().__init__()
        hidden_dim = out_dim if hidden_dim is None else hidden_dim
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.act = get_activation(act)
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Adapter(nn.Module):
    """Residual bottleneck adapter: ``x + scale * up(act(down(x)))``, identity at initialisation."""

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", scale: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = get_activation(act)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.up(self.act(self.down(x)))
