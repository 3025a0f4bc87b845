"""The pipeline config: one TOML file read by the Spark jobs and by the trainer.

Each section of the file maps to one dataclass below, and every field carries a
docstring. Unknown keys, wrong types and invalid values raise ``ConfigError``
with the dotted key (for example ``actions[2].attribution_window``) and the fix.

Example::

    cfg = load_config("configs/demo.toml", overrides=["training.epochs=2"])
    [a.name for a in cfg.actions]
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ConfigError(ValueError):
    """Invalid pipeline config; the message names the key, the value and the fix."""


def parse_duration(value: str | int, key: str) -> int:
    """Parse ``"30m"``, ``"12h"``, ``"7d"`` or an integer number of seconds into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as '1h' or '7d', got {value!r}")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(
                f"{key}: invalid duration {value!r}; write a number with a unit s, m, h or d, "
                "for example '30m' or '7d'"
            )
        seconds = int(float(match.group(1)) * _DURATION_SECONDS[match.group(2)])
    if seconds <= 0:
        raise ConfigError(f"{key}: duration must be positive, got {value!r}")
    return seconds


@dataclass
class ActionConfig:
    name: str
    """Action name exactly as it appears in the event log's action column, e.g. ``click``."""

    attribution_window: str
    """How long after an impression an event of this action still counts, e.g. ``'1h'``, ``'7d'``."""

    value_weight: float = 0.0
    """Weight of this action's probability in the value score (negative for bad actions)."""

    task_weight: float = 1.0
    """Weight of this action's loss in the summed training loss."""

    @property
    def window_seconds(self) -> int:
        """The attribution window in seconds."""
        return parse_duration(self.attribution_window, f"actions[{self.name}].attribution_window")

    @property
    def label_column(self) -> str:
        """Name of the 0/1 label column that the label join writes for this action."""
        return f"label_{self.name}"


@dataclass
class ImpressionColumns:
    """Column names in the impression log. The label join renames them to the field names."""

    impression_id: str = "impression_id"
    """Unique id of the impression (integer)."""

    user_id: str = "user_id"
    """Id of the user who saw the impression (integer)."""

    item_id: str = "item_id"
    """Id of the item shown (integer)."""

    timestamp: str = "timestamp"
    """Time the impression was shown: a timestamp, or an integer epoch in ``columns.timestamp_unit``."""

    request_id: str | None = None
    """Optional id of the request (page view) that showed several items; None if absent."""

    position: str | None = "position"
    """Optional slot position of the item in the request; None if absent."""


@dataclass
class EventColumns:
    """Column names in the action event log."""

    user_id: str = "user_id"
    """Id of the user who acted (integer)."""

    item_id: str = "item_id"
    """Id of the item acted on (integer)."""

    action: str = "action"
    """Action name (string), matched against ``actions[].name``."""

    timestamp: str = "timestamp"
    """Time of the event: a timestamp, or an integer epoch in ``columns.timestamp_unit``."""

    impression_id: str | None = "impression_id"
    """Optional column with the impression the event belongs to; the column may be absent or NULL."""


@dataclass
class ColumnsConfig:
    impressions: ImpressionColumns = field(default_factory=ImpressionColumns)
    """Column mapping of the impression log."""

    events: EventColumns = field(default_factory=EventColumns)
    """Column mapping of the action event log."""

    timestamp_unit: Literal["s", "ms", "us"] = "ms"
    """Unit of integer epoch timestamps; ignored for columns that already have a timestamp type."""


@dataclass
class SparseFeature:
    name: str
    """Feature name, which is also the KeyedJaggedTensor key and the embedding table name."""

    column: str
    """Column in the labelled data: an integer id or a list of integer ids."""

    num_embeddings: int
    """Rows in the embedding table (the number of hash buckets when ``hashing`` is on)."""

    embedding_dim: int = 16
    """Embedding dimension."""

    pooling: Literal["sum", "mean"] = "sum"
    """Pooling of the ids of one row into one vector."""

    hashing: bool = True
    """Hash ids into [0, num_embeddings); when off, an id outside that range is an error."""

    managed_collision: bool = False
    """Use torchrec's managed collision handling for a growing id vocabulary (GPU only, see validate)."""


@dataclass
class DenseFeature:
    column: str
    """Numeric column in the labelled data."""

    normalization: Literal["none", "log1p", "standard"] = "none"
    """``log1p`` applies sign(x) * log(1 + |x|); ``standard`` uses the training split's mean and std."""


@dataclass
class DownsamplingConfig:
    seed: int = 0
    """Seed of the keep/drop hash; the same seed gives the same rows for any partitioning."""

    stratum_column: str | None = None
    """Optional column (for example a surface) crossed with the label pattern to form strata."""

    keep_rates: dict[str, float] = field(default_factory=dict)
    """Explicit keep rates by stratum name, e.g. ``{negative = 0.05}``, in (0, 1]."""

    target_negative_ratio: float | None = None
    """Derive the negative keep rate so that negatives are about this many times the positives."""

    keep_positives: bool = True
    """Keep every row with at least one positive label (keep rate 1) unless ``keep_rates`` names it."""


@dataclass
class SplitConfig:
    eval_start: str | None = None
    """Impressions at or after this UTC time (ISO 8601) form the evaluation split."""

    eval_days: float | None = None
    """Alternative to ``eval_start``: the last this many days before the newest impression."""

    @property
    def eval_start_time(self) -> datetime | None:
        """``eval_start`` as an aware UTC datetime, or None."""
        if self.eval_start is None:
            return None
        return parse_utc(self.eval_start, "split.eval_start")


@dataclass
class ModelConfig:
    shared_layers: list[int] = field(default_factory=lambda: [128, 64])
    """Widths of the shared MLP over the pooled embeddings and dense features."""

    tower_layers: list[int] = field(default_factory=lambda: [32])
    """Widths of each action tower's hidden layers; a final layer of width 1 is added."""

    architecture: Literal["shared_bottom", "mmoe"] = "shared_bottom"
    """``shared_bottom``: one shared MLP feeds every tower. ``mmoe``: ``num_experts`` expert MLPs,
    mixed for each tower by its own softmax gate over the expert outputs (multi-gate mixture of experts)."""

    num_experts: int = 4
    """Experts of the ``mmoe`` architecture; ignored by ``shared_bottom``."""

    expert_layers: list[int] = field(default_factory=lambda: [64, 32])
    """Widths of each expert's MLP in the ``mmoe`` architecture; the last width feeds the towers."""


@dataclass
class TrainingConfig:
    batch_size: int = 1024
    """Examples per rank per step."""

    embedding_lr: float = 0.05
    """Learning rate of the fused embedding optimizer."""

    embedding_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd"] = "rowwise_adagrad"
    """Optimizer fused into the embedding backward pass."""

    dense_lr: float = 0.001
    """Learning rate of the dense (Adam) optimizer."""

    epochs: int = 1
    """Passes over the training split."""

    seed: int = 0
    """Seed for model initialisation and shuffling."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Device for each rank; ``cuda`` uses the GPU of the rank's LOCAL_RANK."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process group backend; ``auto`` picks nccl on cuda and gloo on cpu."""

    loss_weighting: Literal["none", "inverse_keep_rate"] = "none"
    """Loss weighting. ``none`` learns the downsampled odds, and evaluation corrects them with
    the keep rates. ``inverse_keep_rate`` weights each row by 1 / keep_rate, so no correction is needed."""

    log_every: int = 20
    """Steps between metric lines."""

    reader: Literal["native", "petastorm"] = "native"
    """Parquet reader: ``native`` (Arrow row groups to KeyedJaggedTensor) or ``petastorm``, which
    runs only in the separate ``.venv-petastorm`` environment that ``make petastorm-venv`` creates."""

    loader_workers: int | None = None
    """DataLoader worker processes per rank that read and batch; 0 reads in the training process.
    Unset means 0 on cpu and 2 on cuda. On cpu, copying each batch out of a worker process costs
    more than the overlap gains, as benchmarks/loader.py shows. On cuda the workers pin memory
    and prefetch, so decoding overlaps the GPU step."""

    shuffle: bool = True
    """Shuffle the training rows: a seeded row-group order per epoch plus the shuffle buffer."""

    shuffle_buffer_rows: int = 100_000
    """Rows per loader worker that are mixed in memory before batches are drawn; 0 keeps row order
    within the row-group order."""

    prefetch_batches: int = 2
    """Batches that each loader worker prepares ahead of the training step."""

    checkpoint_every_steps: int = 500
    """Steps between periodic checkpoints in ``<out>/checkpoints/``; 0 saves only at the end of training."""

    keep_last_checkpoints: int = 3
    """Number of newest checkpoints kept; older ones are deleted after each save."""

    resume: bool = True
    """Continue an unfinished run from its newest checkpoint in ``<out>/checkpoints/``; false starts over."""

    eval_every_epochs: int = 1
    """Epochs between evaluations on the evaluation split during training, for the evaluation
    curve; 0 evaluates only once, after the last epoch."""

    @property
    def resolved_loader_workers(self) -> int:
        """DataLoader workers per rank after resolving the unset default."""
        if self.loader_workers is not None:
            return self.loader_workers
        return 2 if self.device == "cuda" else 0

    @property
    def resolved_backend(self) -> str:
        """The process group backend after resolving ``auto``."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.device == "cuda" else "gloo"


@dataclass
class ShardingConfig:
    memory_budget_gib: float = 2.0
    """Memory per rank that the planner may use for embedding tables, in GiB."""

    allowed_sharding_types: list[str] = field(
        default_factory=lambda: ["table_wise", "column_wise", "data_parallel"]
    )
    """Sharding types the planner may choose. row_wise and table_row_wise plan on GPU only."""


@dataclass
class EvaluationConfig:
    ndcg_group: Literal["auto", "request", "user_day"] = "auto"
    """Rows ranked together for the value-score NDCG. ``request``: rows with one request id.
    ``user_day``: rows of one user on one calendar day. ``auto``: ``request`` when
    ``columns.impressions.request_id`` is set, else ``user_day``."""

    day_utc_offset_hours: float = 0.0
    """Offset from UTC of the time zone whose calendar days form the ``user_day`` groups, e.g. 8 for UTC+8."""

    ndcg_cutoffs: list[int] = field(default_factory=lambda: [10])
    """Cutoffs k of the NDCG@k values reported beside the NDCG over whole groups."""


@dataclass
class PipelineConfig:
    actions: list[ActionConfig]
    """The actions to label and predict, in tower order."""

    sparse_features: list[SparseFeature]
    """Id features looked up in sharded embedding tables."""

    dense_features: list[DenseFeature] = field(default_factory=list)
    """Numeric features fed to the shared layers."""

    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column mapping of the input logs."""

    downsampling: DownsamplingConfig = field(default_factory=DownsamplingConfig)
    """Stratified negative downsampling of the training split."""

    split: SplitConfig = field(default_factory=SplitConfig)
    """Time-based train/eval split."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Shared layers and towers."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Optimisation and runtime settings."""

    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """Embedding sharding plan settings."""

    k8s: K8sConfig = field(default_factory=lambda: K8sConfig())
    """Kubernetes deployment written by ``valuerank k8s render``; the stages themselves ignore it."""

    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Value-score ranking evaluation settings."""

    def action(self, name: str) -> ActionConfig:
        """Return the action called ``name``."""
        for action in self.actions:
            if action.name == name:
                return action
        raise KeyError(name)

    @property
    def label_columns(self) -> list[str]:
        """Label column names in action order."""
        return [a.label_column for a in self.actions]


def parse_utc(value: str, key: str) -> datetime:
    """Parse an ISO 8601 time; a time without an offset is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as error:
        raise ConfigError(
            f"{key}: invalid time {value!r}; write ISO 8601 such as '2022-04-19T00:00:00Z'"
        ) from error
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _build(cls: type, data: object, key: str):
    """Build dataclass ``cls`` from parsed TOML ``data``, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; valid keys here are: {', '.join(sorted(fields))}"
        )

    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{key}.{name}" if key else name)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{key}." if key else ""
        raise ConfigError(f"missing required key {where}{missing[0]}")
    return cls(**kwargs)


def _convert(hint, value, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if origin in (typing.Union, types.UnionType):
        # TOML has no null: an empty string switches an optional setting off.
        if (value is None or value == "") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: invalid value {value!r}; expected one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {key}")


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Check values that the types alone cannot; raise ConfigError naming the key."""
    if not cfg.actions:
        raise ConfigError("actions: at least one [[actions]] table is required")
    seen = set()
    for i, action in enumerate(cfg.actions):
        key = f"actions[{i}]"
        if not _NAME.match(action.name):
            raise ConfigError(
                f"{key}.name: invalid action name {action.name!r}; use lower case letters, "
                "digits and underscores, starting with a letter"
            )
        if action.name in seen:
            raise ConfigError(f"{key}.name: duplicate action {action.name!r}")
        seen.add(action.name)
        parse_duration(action.attribution_window, f"{key}.attribution_window")
        if action.task_weight < 0:
            raise ConfigError(f"{key}.task_weight: must be >= 0, got {action.task_weight}")

    if not cfg.sparse_features:
        raise ConfigError("sparse_features: at least one [[sparse_features]] table is required")
    names = set()
    for i, feature in enumerate(cfg.sparse_features):
        key = f"sparse_features[{i}]"
        if feature.name in names:
            raise ConfigError(f"{key}.name: duplicate sparse feature {feature.name!r}")
        names.add(feature.name)
        if feature.num_embeddings <= 0:
            raise ConfigError(f"{key}.num_embeddings: must be positive, got {feature.num_embeddings}")
        if feature.embedding_dim <= 0:
            raise ConfigError(f"{key}.embedding_dim: must be positive, got {feature.embedding_dim}")
    # A feature that reads a label or a downsampling column would leak the outcome into the model.
    reserved = {*cfg.label_columns, "weight", "keep_rate", "stratum"}
    for kind, features in (("sparse_features", cfg.sparse_features), ("dense_features", cfg.dense_features)):
        for i, feature in enumerate(features):
            if feature.column in reserved:
                raise ConfigError(
                    f"{kind}[{i}].column: {feature.column!r} is a label or downsampling column, which would "
                    "leak the outcome into the features; use an input column"
                )

    down = cfg.downsampling
    for stratum, rate in down.keep_rates.items():
        if not 0 < rate <= 1:
            raise ConfigError(
                f"downsampling.keep_rates.{stratum}: keep rate {rate} is outside (0, 1]; "
                "use 1 to keep every row or a smaller positive rate to drop some"
            )
    if down.target_negative_ratio is not None and down.target_negative_ratio <= 0:
        raise ConfigError(
            f"downsampling.target_negative_ratio: must be positive, got {down.target_negative_ratio}"
        )

    if (cfg.split.eval_start is None) == (cfg.split.eval_days is None):
        raise ConfigError("split: set exactly one of split.eval_start or split.eval_days")
    cfg.split.eval_start_time  # raises ConfigError on an invalid time
    if cfg.split.eval_days is not None and cfg.split.eval_days <= 0:
        raise ConfigError(f"split.eval_days: must be positive, got {cfg.split.eval_days}")

    for key, layers in (("model.shared_layers", cfg.model.shared_layers), ("model.tower_layers", cfg.model.tower_layers)):
        if any(width <= 0 for width in layers):
            raise ConfigError(f"{key}: layer widths must be positive, got {layers}")

    if cfg.model.architecture == "mmoe":
        if cfg.model.num_experts < 1:
            raise ConfigError(f"model.num_experts: must be at least 1 for architecture 'mmoe', got {cfg.model.num_experts}")
        if not cfg.model.expert_layers or any(width <= 0 for width in cfg.model.expert_layers):
            raise ConfigError(
                f"model.expert_layers: list at least one positive width for architecture 'mmoe', got {cfg.model.expert_layers}"
            )
    if cfg.columns.impressions.request_id is None and cfg.evaluation.ndcg_group == "request":
        raise ConfigError(
            "evaluation.ndcg_group: 'request' needs columns.impressions.request_id; set it, or use 'user_day' or 'auto'"
        )
    if not -24 < cfg.evaluation.day_utc_offset_hours < 24:
        raise ConfigError(
            f"evaluation.day_utc_offset_hours: must lie strictly between -24 and 24, got {cfg.evaluation.day_utc_offset_hours}"
        )
    if any(k <= 0 for k in cfg.evaluation.ndcg_cutoffs):
        raise ConfigError(f"evaluation.ndcg_cutoffs: cutoffs must be positive, got {cfg.evaluation.ndcg_cutoffs}")

    train = cfg.training
    for name in ("batch_size", "epochs", "log_every"):
        if getattr(train, name) <= 0:
            raise ConfigError(f"training.{name}: must be positive, got {getattr(train, name)}")
    for name in ("embedding_lr", "dense_lr"):
        if getattr(train, name) <= 0:
            raise ConfigError(f"training.{name}: must be positive, got {getattr(train, name)}")
    for name in ("loader_workers", "shuffle_buffer_rows"):
        if getattr(train, name) is not None and getattr(train, name) < 0:
            raise ConfigError(f"training.{name}: must be >= 0, got {getattr(train, name)}")
    if train.prefetch_batches <= 0:
        raise ConfigError(f"training.prefetch_batches: must be positive, got {train.prefetch_batches}")
    if train.device == "cpu" and train.backend == "nccl":
        raise ConfigError("training.backend: nccl needs device = 'cuda'; use 'gloo' or 'auto' on cpu")
    if train.checkpoint_every_steps < 0:
        raise ConfigError(
            f"training.checkpoint_every_steps: must be >= 0 (0 saves only at the end), got {train.checkpoint_every_steps}"
        )
    if train.eval_every_epochs < 0:
        raise ConfigError(f"training.eval_every_epochs: must be >= 0 (0 evaluates only at the end), got {train.eval_every_epochs}")
    if train.keep_last_checkpoints < 1:
        raise ConfigError(f"training.keep_last_checkpoints: must be at least 1, got {train.keep_last_checkpoints}")
    for i, feature in enumerate(cfg.sparse_features):
        if not feature.managed_collision:
            continue
        if train.device == "cpu":
            # Measured with torchrec 1.8: the managed collision collection plans only with
            # row_wise sharding, which the planner rejects on cpu.
            raise ConfigError(
                f"sparse_features[{i}].managed_collision: torchrec's managed collision tables need row_wise "
                "sharding, which does not plan on cpu; set managed_collision = false and keep hashing = true "
                "on cpu, or train with device = 'cuda'"
            )
        # TODO: build a ManagedCollisionEmbeddingBagCollection for these features; that path
        # needs a GPU to test, and none was available.
        raise ConfigError(
            f"sparse_features[{i}].managed_collision: managed collision is not built into the model yet; "
            "set managed_collision = false and use hashing = true"
        )

    if cfg.sharding.memory_budget_gib <= 0:
        raise ConfigError(f"sharding.memory_budget_gib: must be positive, got {cfg.sharding.memory_budget_gib}")
    if not cfg.sharding.allowed_sharding_types:
        raise ConfigError("sharding.allowed_sharding_types: list at least one sharding type")
    for i, kind in enumerate(cfg.sharding.allowed_sharding_types):
        if kind not in SHARDING_TYPES:
            raise ConfigError(
                f"sharding.allowed_sharding_types[{i}]: invalid value {kind!r}; "
                f"expected one of {', '.join(SHARDING_TYPES)}"
            )
    return cfg


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(
            f"override {text!r}: write it as section.key=value, e.g. training.epochs=2 or actions.0.value_weight=5"
        )
    path, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path.strip().split("."), value


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Build and validate a config from a parsed TOML table plus ``section.key=value`` overrides."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            node = _child(node, part, text)
        if isinstance(node, list):
            node[_list_index(node, path[-1], text)] = value
        else:
            node[path[-1]] = value
    return validate(_build(PipelineConfig, data, ""))


def _list_index(node: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {text!r}: {part!r} is not an index of a list with {len(node)} entries")
    return int(part)


def _child(node: dict | list, part: str, text: str) -> dict | list:
    """Step into table key or list index ``part`` of an override path, creating missing tables."""
    if isinstance(node, list):
        return node[_list_index(node, part, text)]
    child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"override {text!r}: {part} is a value, not a table or list")
    return child


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read the pipeline config at ``path`` (TOML) and apply overrides."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from error
    try:
        return config_from_dict(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def to_dict(cfg: PipelineConfig) -> dict:
    """Return the config as plain data, for manifests, checkpoints and exported models."""
    return dataclasses.asdict(cfg)


_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SPARK_MEMORY = re.compile(r"^\d+[kmgt]$")


@dataclass
class K8sConfig:
    """Kubernetes deployment of the three stages. ``valuerank k8s render`` reads it; the stages ignore it.

    Paths are relative to ``data_mount``, where every pod mounts the claim ``data_claim``, so the
    Spark driver, the executors and every training node see the same files.
    """

    name: str = "valuerank"
    """Prefix of every object name, e.g. ``valuerank-train``; a DNS label of at most 40 characters."""

    image: str = "valuerank:0.1.0-cpu"
    """Container image built from docker/Dockerfile (``-cpu`` or ``-cuda`` build)."""

    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """Pull policy of every container."""

    nodes: int = 2
    """Training nodes (PyTorchJob workers), one pod each."""

    min_nodes: int | None = None
    """Minimum nodes that the elastic job keeps training with after losing some; default ``nodes``."""

    processes_per_node: int = 1
    """Ranks per training node; on ``training.device = 'cuda'`` also the GPUs requested per node."""

    cpu: str = "4"
    """CPU request and limit of one training pod (a Kubernetes quantity, e.g. ``'4'`` or ``'3500m'``)."""

    memory: str = "16Gi"
    """Memory request and limit of one training pod, e.g. ``'16Gi'``."""

    shm_size: str = "2Gi"
    """Size of the in-memory /dev/shm volume of a training pod (NCCL and data loading use it)."""

    max_restarts: int = 3
    """Times torchrun restarts all ranks of the job after a failure before the pod fails."""

    rdzv_port: int = 29400
    """Port of the c10d rendezvous store on node 0."""

    rdzv_timeout: str = "15m"
    """How long a node waits for node 0 and the other nodes, e.g. ``'15m'``."""

    data_claim: str = "valuerank-data"
    """PersistentVolumeClaim (ReadWriteMany) that contains the input logs and every stage's output."""

    data_mount: str = "/data"
    """Mount path of the claim in every pod."""

    impressions: str = "raw/impressions"
    """Impression log, relative to ``data_mount``."""

    events: str = "raw/events"
    """Action event log, relative to ``data_mount``."""

    run_dir: str = "runs/k8s"
    """Run folder relative to ``data_mount``; gets ``labelled/``, ``downsampled/`` and ``model/``."""

    spark_version: str = "4.3.0"
    """Spark version of the image (the pinned pyspark), reported to the Spark operator."""

    spark_driver_cores: int = 1
    """CPU cores of the Spark driver pod."""

    spark_driver_memory: str = "4g"
    """JVM heap of the Spark driver in Spark notation, e.g. ``'4g'``."""

    spark_executors: int = 2
    """Spark executor pods."""

    spark_executor_cores: int = 2
    """CPU cores of one Spark executor pod."""

    spark_executor_memory: str = "4g"
    """JVM heap of one Spark executor in Spark notation, e.g. ``'4g'``."""

    def __post_init__(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 40:
            raise ConfigError(
                f"k8s.name: invalid name {self.name!r}; use at most 40 lower case letters, digits and '-', "
                "starting with a letter"
            )
        if not _DNS_LABEL.match(self.data_claim):
            raise ConfigError(f"k8s.data_claim: {self.data_claim!r} is not a valid claim name (lower case, digits, '-')")
        for key in ("nodes", "processes_per_node", "spark_driver_cores", "spark_executors", "spark_executor_cores"):
            if getattr(self, key) < 1:
                raise ConfigError(f"k8s.{key}: must be at least 1, got {getattr(self, key)}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(f"k8s.min_nodes: must be between 1 and k8s.nodes = {self.nodes}, got {self.min_nodes}")
        if self.max_restarts < 0:
            raise ConfigError(f"k8s.max_restarts: must be 0 or more, got {self.max_restarts}")
        if not 1024 <= self.rdzv_port <= 65535:
            raise ConfigError(f"k8s.rdzv_port: use a port in 1024..65535, got {self.rdzv_port}")
        parse_duration(self.rdzv_timeout, "k8s.rdzv_timeout")
        for key in ("cpu", "memory", "shm_size"):
            if not _QUANTITY.match(getattr(self, key)):
                raise ConfigError(
                    f"k8s.{key}: {getattr(self, key)!r} is not a Kubernetes quantity; write e.g. '4', '3500m' or '16Gi'"
                )
        for key in ("spark_driver_memory", "spark_executor_memory"):
            if not _SPARK_MEMORY.match(getattr(self, key)):
                raise ConfigError(f"k8s.{key}: {getattr(self, key)!r} is not a Spark memory size; write e.g. '4g' or '512m'")
        if not self.data_mount.startswith("/"):
            raise ConfigError(f"k8s.data_mount: must be an absolute path, got {self.data_mount!r}")
        for key in ("impressions", "events", "run_dir"):
            path = getattr(self, key)
            if path.startswith("/") or ".." in Path(path).parts or not path:
                raise ConfigError(
                    f"k8s.{key}: {path!r} must be a path relative to k8s.data_mount without '..', e.g. 'raw/events'"
                )

    @property
    def rdzv_timeout_seconds(self) -> int:
        """``rdzv_timeout`` in seconds."""
        return parse_duration(self.rdzv_timeout, "k8s.rdzv_timeout")
