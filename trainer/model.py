"""The multi-task ranking model: embeddings, shared layers, one tower per action."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from valuerank.config import PipelineConfig

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def embedding_configs(cfg: PipelineConfig) -> list[EmbeddingBagConfig]:
    """Build one embedding table config per sparse feature, named ``t_<feature>``."""
    return [
        EmbeddingBagConfig(
            name=f"t_{feature.name}",
            num_embeddings=feature.num_embeddings,
            embedding_dim=feature.embedding_dim,
            feature_names=[feature.name],
            pooling=_POOLING[feature.pooling],
        )
        for feature in cfg.sparse_features
    ]


def _mlp(in_features: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers)


class MultiTaskModel(nn.Module):
    """Multi-task model with one tower per action, on a shared bottom or a mixture of experts.

    Pooled embeddings [B, sum(embedding_dim)] are concatenated with the dense features
    [B, num_dense] into the input x. ``model.architecture`` picks what the towers see:

    - ``shared_bottom``: one shared MLP over x feeds every tower.
    - ``mmoe`` (multi-gate mixture of experts): E expert MLPs run on x. Each action has a
      gate, a linear layer over x followed by a softmax over the E experts, and its tower
      reads the gate-weighted sum of the expert outputs.

    Each tower maps its input to one logit. ``forward`` returns logits [B, num_actions] in
    config action order.

    Example::

        model = MultiTaskModel(cfg, device=torch.device("meta"))
        # wrap with DistributedModelParallel, which materialises the tables on each rank
    """

    def __init__(self, cfg: PipelineConfig, device: torch.device | None = None):
        super().__init__()
        tables = embedding_configs(cfg)
        self.ebc = EmbeddingBagCollection(tables=tables, device=device or torch.device("cpu"))
        self.architecture = cfg.model.architecture

        # Dense layers are built on the CPU and moved by DistributedModelParallel. Only the
        # embedding tables start on the meta device, so no rank allocates a whole table.
        input_width = sum(t.embedding_dim for t in tables) + len(cfg.dense_features)
        if self.architecture == "mmoe":
            self.experts = nn.ModuleList(_mlp(input_width, cfg.model.expert_layers) for _ in range(cfg.model.num_experts))
            self.gates = nn.ModuleList(nn.Linear(input_width, cfg.model.num_experts) for _ in cfg.actions)
            bottom_width = cfg.model.expert_layers[-1]
        else:
            self.shared = _mlp(input_width, cfg.model.shared_layers)
            bottom_width = cfg.model.shared_layers[-1] if cfg.model.shared_layers else input_width
        tower_width = cfg.model.tower_layers[-1] if cfg.model.tower_layers else bottom_width
        self.towers = nn.ModuleList(
            nn.Sequential(_mlp(bottom_width, cfg.model.tower_layers), nn.Linear(tower_width, 1))
            for _ in cfg.actions
        )
        self.action_names = [a.name for a in cfg.actions]

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        features = torch.cat([self.ebc(sparse).values(), dense], dim=1)
        if self.architecture == "shared_bottom":
            shared = self.shared(features)
            return torch.cat([tower(shared) for tower in self.towers], dim=1)

        # experts: [B, E, W]; gates: [B, A, E]; tower inputs: [B, A, W].
        experts = torch.stack([expert(features) for expert in self.experts], dim=1)
        tower_inputs = torch.bmm(self._gate_weights(features), experts)
        return torch.cat([tower(tower_inputs[:, i]) for i, tower in enumerate(self.towers)], dim=1)

    def _gate_weights(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(gate(features), dim=1) for gate in self.gates], dim=1)

    @torch.no_grad()
    def gate_weights(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Return the MMoE gate weights [B, num_actions, num_experts]; each [b, a, :] sums to 1.

        Raises ValueError for the shared-bottom architecture, which has no gates.
        """
        if self.architecture != "mmoe":
            raise ValueError(f"model.architecture = {self.architecture!r} has no gates; gate weights exist only for 'mmoe'")
        features = torch.cat([self.ebc(sparse).values(), dense], dim=1)
        return self._gate_weights(features)
