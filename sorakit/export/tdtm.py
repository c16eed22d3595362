"""The torch TDTM reference: what the TDTM graph pass must compute, op for op.

Merge: frame pairs (0,1), (2,3), ... of tokens [B, T, S, C] are averaged, (a + b) * 0.5; an
odd last frame is kept as it is. Unmerge: each merged frame is repeated for both frames of
its pair; the odd last frame maps back to itself. RoPE of temporal attention uses the merged
frames' positions: "midpoint" (2j + 0.5) or "compressed" (j, the reference code's choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sorakit.export.stdit3 import STDiT3
from sorakit.graph_passes.tdtm import merged_positions


@dataclass(frozen=True)
class TokenMerge:
    mode: str = "midpoint"
    scope: str = "attention"  # "block": the MLPs run on merged frames too

    # Mirror of sorakit.graph_passes.tdtm._merge_nodes: keep in sync
    # (tests/test_graph_passes.py::test_tdtm_mirrors_the_torch_reference and test_tdtm_matches_torch_reference).
    @staticmethod
    def merge(x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        te = T - T % 2
        out = (x[:, 0:te:2] + x[:, 1:te:2]) * 0.5
        return torch.cat([out, x[:, T - 1 : T]], dim=1) if T % 2 else out

    # Mirror of sorakit.graph_passes.tdtm._unmerge_nodes: keep in sync
    # (tests/test_graph_passes.py::test_tdtm_mirrors_the_torch_reference and test_tdtm_matches_torch_reference).
    @staticmethod
    def unmerge_to(y: torch.Tensor, T: int) -> torch.Tensor:
        pairs = T // 2
        dup = torch.stack([y[:, :pairs], y[:, :pairs]], dim=2).flatten(1, 2)
        return torch.cat([dup, y[:, pairs:]], dim=1) if T % 2 else dup

    def positions(self, T: int) -> torch.Tensor:
        return torch.from_numpy(merged_positions(T, self.mode))

    def bind(self, T: int) -> BoundMerge:
        return BoundMerge(self, T)


@dataclass(frozen=True)
class BoundMerge:
    """A TokenMerge for a known frame count (what STDiT3Block's ``tdtm`` argument expects)."""

    tm: TokenMerge
    T: int

    @property
    def mlp(self) -> bool:
        return self.tm.scope == "block"

    def merge(self, x):
        return self.tm.merge(x)

    def unmerge(self, y):
        return self.tm.unmerge_to(y, self.T)

    def positions(self, T: int):
        return self.tm.positions(T)


def block_group_forward(group, x, y, y_bias, t_mlp, mode: str = "midpoint", scope: str = "attention"):
    """Run an exported BlockGroup module the TDTM way (the reference for its TDTM variant)."""
    T = x.shape[1]
    bound = TokenMerge(mode, scope).bind(T)
    rope = group.rope.tables(T, bound.positions(T)) if len(group.temporal_blocks) else None
    for kind, i in group.order:
        if kind == "spatial":
            x = group.spatial_blocks[str(i)](x, y, y_bias, t_mlp, tdtm=bound)
        else:
            x = group.temporal_blocks[str(i)](x, y, y_bias, t_mlp, rope, tdtm=bound)
    return x


def stdit_forward(model: STDiT3, *args, mode: str = "midpoint", scope: str = "attention", **kwargs):
    """The full STDiT3 with TDTM in every block."""
    T = -(-args[0].shape[2] // model.config.patch_size[0])
    return model(*args, tdtm=TokenMerge(mode, scope).bind(T), **kwargs)
