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
    """Shared-bottom multi-task model.

    Pooled embeddings [B, sum(embedding_dim)] are concatenated with the dense features
    [B, num_dense], passed through the shared MLP, and each action's tower maps the
    shared output to one logit. ``forward`` returns logits [B, num_actions] in config
    action order.

    Example::

        model = MultiTaskModel(cfg, device=torch.device("meta"))
        # wrap with DistributedModelParallel, which materialises the tables on each rank
    """

    def __init__(self, cfg: PipelineConfig, device: torch.device | None = None):
        super().__init__()
        tables = embedding_configs(cfg)
        self.ebc = EmbeddingBagCollection(tables=tables, device=device or torch.device("cpu"))

        # Dense layers are built on the CPU and moved by DistributedModelParallel. Only the
        # embedding tables start on the meta device, so no rank allocates a whole table.
        input_width = sum(t.embedding_dim for t in tables) + len(cfg.dense_features)
        self.shared = _mlp(input_width, cfg.model.shared_layers)
        shared_width = cfg.model.shared_layers[-1] if cfg.model.shared_layers else input_width
        tower_width = cfg.model.tower_layers[-1] if cfg.model.tower_layers else shared_width
        self.towers = nn.ModuleList(
            nn.Sequential(_mlp(shared_width, cfg.model.tower_layers), nn.Linear(tower_width, 1))
            for _ in cfg.actions
        )
        self.action_names = [a.name for a in cfg.actions]

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(sparse).values()
        shared = self.shared(torch.cat([pooled, dense], dim=1))
        return torch.cat([tower(shared) for tower in self.towers], dim=1)
