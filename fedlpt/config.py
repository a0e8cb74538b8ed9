"""The run configuration: each key of ``[tool.flwr.app.config]`` declared once, checked at parse.

Each field of :class:`AppConfig` is one kebab-case run-config key (``num_server_rounds``
is ``num-server-rounds``) with its default, its help line and its check, so the parser,
``pyproject.toml`` (a test compares) and the key table of the docs all come from here.
A value that fedlpt cannot use raises :class:`ConfigError` naming the key, the value and
what is allowed, before anything is built or loaded.

This module only parses: it imports the light name registries (datasets, strategies) and
the BFP format checks, never a dataset, a model or a Flower strategy.
"""

from __future__ import annotations

import math
import re
import tomllib
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .data.catalog import DATASET_NAMES, PARTITIONER_NAMES
from .quant.bfp import ROUNDINGS, check_bits, parse_block
from .quant.entropy import COMPRESSIONS
from .quant.training import ENGINES, LowPrecision, integer_blockers
from .strategy.registry import COMMON_PARAMS, STRATEGIES, WEIGHTINGS, strategy_key

STRATEGY_PREFIX = "strategy."
ROLES = ("weight", "activation", "error", "gradient")  # quantized quantities of a step
UPLOADS = ("weights", "delta")
MODEL_NAMES = ("convnet", "mlp", "resnet18")  # built by fedlpt.task.build_model
OPTIMIZER_NAMES = ("adam", "sgd")  # built by fedlpt.task.make_optimizer
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


NODE_PRECISION_KEYS = ("bits", *(f"{role}-bits" for role in ROLES), "upload-bits")


class ConfigError(ValueError):
    """A run-config or node-config value that fedlpt cannot use; names the key."""


@dataclass(frozen=True)
class Setting:
    """How one run-config key is documented and checked (the field's metadata).

    ``check`` returns None when the value is usable, else the rule it breaks
    ("must be >= 1"). ``aliases`` are deprecated names still read, with a warning.
    """

    help: str
    choices: tuple[Any, ...] = ()
    check: Callable[[Any], str | None] | None = None
    aliases: tuple[str, ...] = ()


def _setting(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(help, **spec)})


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number > 0"


def _finite_non_negative(v: float) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be a finite number >= 0"


def _bits(v: int) -> str | None:
    try:
        check_bits(v, allow_fp32=True)
    except ValueError:
        return "must be 2..16, or 32 for FP32"
    return None


def _role_bits(v: int) -> str | None:
    return None if v == 0 else _bits(v)


def _block(v: str | int) -> str | None:
    try:
        parse_block(v)
    except ValueError:
        return "must be 'tensor', 'row', 'kernel' or a positive int"
    return None


def _block_or_empty(v: str | int) -> str | None:
    return None if v == "" else _block(v)


def _rounding_or_empty(v: str) -> str | None:
    if v == "" or v in ROUNDINGS:
        return None
    return f"must be one of {list(ROUNDINGS)}, or empty for `rounding`"


def _decay(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


def _device(v: str) -> str | None:
    return None if _DEVICE.fullmatch(v) else "must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


@dataclass(frozen=True)
class AppConfig:
    """Every run-config key fedlpt reads (kebab-case in TOML, snake_case here)."""

    preset: str = _setting(
        "",
        "a preset of `conf/` (e.g. `paper-fmnist`) applied first; every key you set "
        "yourself wins over it",
    )
    num_server_rounds: int = _setting(100, "federated rounds", check=_at_least(1))
    dataset: str = _setting(
        "digits",
        "`digits` (bundled with scikit-learn, offline), `fmnist` (offline with Debian's "
        "dataset-fashion-mnist), `mnist`, `cifar10`, `cifar100`",
        choices=DATASET_NAMES,
    )
    data_dir: str = _setting(
        "", "a folder of IDX files or a `datasets` `save_to_disk` copy; empty: look elsewhere"
    )
    partitioner: str = _setting(
        "dirichlet",
        "`dirichlet` (flwr-datasets' label skew), `dirichlet-balanced` (the paper's "
        "equal-sized clients), `iid`",
        choices=PARTITIONER_NAMES,
    )
    alpha: float = _setting(
        0.3,
        "Dirichlet concentration of the label skew (smaller: more skew); > 0",
        check=lambda v: None if math.isfinite(v) else "must be a finite number",
    )
    train_examples: int = _setting(
        0, "a fixed stratified subsample of the train pool; 0: all of it", check=_at_least(0)
    )
    test_examples: int = _setting(
        0, "a fixed stratified subsample of the server's test set; 0: all", check=_at_least(0)
    )
    local_test_fraction: float = _setting(
        0.2,
        "share of each client's data held out for client-side evaluation, only when "
        "`strategy.fraction-evaluate` > 0",
        check=lambda v: None if 0.0 <= v < 1.0 else "must be in [0, 1)",
    )
    seed: int = _setting(4, "partitioning, model init, node sampling, rounding", check=_at_least(0))
    local_epochs: int = _setting(1, "local epochs per round", check=_at_least(1))
    batch_size: int = _setting(32, "local batch size", check=_at_least(1))
    optimizer: str = _setting("adam", "local optimizer", choices=OPTIMIZER_NAMES)
    learning_rate: float = _setting(0.001, "local learning rate", check=_positive, aliases=("lr",))
    momentum: float = _setting(0.0, "SGD momentum", check=_finite_non_negative)
    model: str = _setting(
        "convnet", "`convnet` (the paper's), `mlp`, `resnet18`", choices=MODEL_NAMES
    )
    bits: int = _setting(
        8,
        "word length of weights, activations, errors, gradients and upload; 32: FP32",
        check=_bits,
    )
    weight_bits: int = _setting(
        0, "word length of the weights (the paper's W_w); 0: `bits`", check=_role_bits
    )
    activation_bits: int = _setting(
        0, "word length of the activations (W_a); 0: `bits`", check=_role_bits
    )
    error_bits: int = _setting(
        0, "word length of the back-propagated errors (W_e); 0: `bits`", check=_role_bits
    )
    gradient_bits: int = _setting(
        0, "word length of the weight gradients (W_g); 0: `bits`", check=_role_bits
    )
    block: str | int = _setting(
        "row",
        'exponent sharing: `tensor`, `row`, `kernel` (the paper\'s "BC") or an int k',
        check=_block,
    )
    rounding: str = _setting("stochastic", "rounding onto the grid", choices=ROUNDINGS)
    quantize_optimizer_state: bool = _setting(False, "also round Adam moments / SGD momentum")
    engine: str = _setting(
        "auto",
        "the arithmetic of low-precision training: `integer` (int8 products of the codes, "
        "activations kept in 8 bits for backward; needs weights, activations and errors at "
        "<= 8 bits, weight `block` `tensor` or `row`), `emulated` (float32 products, as the "
        "paper's code), `auto` (integer where the recipe allows it and this node multiplies "
        "int8 faster than float32). Same results either way",
        choices=ENGINES,
    )
    upload: str = _setting(
        "weights",
        "what clients send: `weights` (the paper) or `delta` (their change to the model)",
        choices=UPLOADS,
    )
    upload_bits: int = _setting(0, "word length of the upload; 0: `weight-bits`", check=_role_bits)
    upload_block: str | int = _setting(
        "",
        "exponent sharing of the upload, as `block`; empty: `block`. Delta uploads at 2-4 "
        "bits want `row`: `kernel` spends 8 exponent bits per conv kernel and per "
        "classifier weight; weights uploaded in another block than trained are re-rounded",
        check=_block_or_empty,
    )
    upload_rounding: str = _setting(
        "",
        "rounding of the upload: `stochastic` or `nearest`; empty: `rounding`. Nearest "
        "rounding of a delta is biased (small changes round to 0 every round): keep "
        "`upload-feedback` on with it",
        check=_rounding_or_empty,
    )
    upload_feedback: bool = _setting(
        True, "with `delta` uploads, clients carry what rounding dropped into their next upload"
    )
    compress: str = _setting(
        "none",
        "lossless zstd coding of the packed upload (`none` or `zstd`; needs the `compress` "
        "extra on the server; a client without it uploads uncompressed)",
        choices=COMPRESSIONS,
    )
    feedback_max_age: int = _setting(
        0,
        "a client's upload residual older than this many rounds is dropped; 0: kept",
        check=_at_least(0),
    )
    downlink_bits: int = _setting(
        32, "bits of the global model sent to the clients; 32: FP32", check=_bits
    )
    downlink_block: str | int = _setting(
        "",
        "exponent sharing of a quantized downlink, as `block`; empty: `block`",
        check=_block_or_empty,
    )
    downlink_feedback: bool = _setting(
        True,
        "with a quantized downlink, send each client the difference to its copy of the "
        "model, the server keeping what rounding dropped",
    )
    ema: bool = _setting(True, "server moving average of the global model")
    ema_decay: float = _setting(0.9, "EMA decay d: w = d*w + (1-d)*w_agg", check=_decay)
    ema_start: int = _setting(1, "first round whose aggregate enters the EMA", check=_at_least(1))
    # The default ramps the decay in (bench.paper, CPU scale, 3 seeds: at round 10 the
    # fixed decay stalls at 43.0 %, the warm-up reaches 45.8 %, no EMA 37.1 %; after 40
    # rounds 55.5 % vs the fixed decay's 55.0 %); the paper presets keep its fixed decay.
    ema_warmup: int = _setting(
        10, "rounds over which the decay ramps from 0 to ema-decay; 0: fixed", check=_at_least(0)
    )
    aggregation_weights: str = _setting(
        "examples",
        "`examples` (by each reply's num-examples, clipped) or `equal` (the paper's "
        "unweighted mean)",
        choices=WEIGHTINGS,
    )
    max_weight_ratio: float = _setting(
        1.0,
        "a num-examples claim above this multiple of the round's median counts as that "
        "multiple; 0: no clip",
        check=_finite_non_negative,
    )
    max_abs_weight: float = _setting(
        1e4, "a reply holding a weight beyond +- this is dropped", check=_positive
    )
    max_failed_rounds: int = _setting(
        5,
        "stop the run after this many consecutive rounds without a usable reply; 0: never",
        check=_at_least(0),
    )
    round_timeout: float = _setting(
        600.0, "seconds a round waits for replies before it goes on without them", check=_positive
    )
    resume_from: str = _setting(
        "", "a run folder whose checkpoint the run continues from (its last completed round)"
    )
    device: str = _setting(
        "auto",
        "where clients train and the server evaluates: `auto` (CUDA if present), "
        "`cpu`, `cuda`, `cuda:N`, `mps`",
        check=_device,
    )
    results_dir: str = _setting("results", "where run folders go ($FEDLPT_RESULTS_DIR overrides)")
    run_name: str = _setting(
        "", "the run folder's name under results-dir; empty: time-dataset-model-bits-strategy"
    )
    strategy: str = field(default="fedavg", metadata={"setting": None})
    strategy_params: Mapping[str, Any] = field(default_factory=dict, metadata={"setting": None})

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppConfig:
        """Read and check a flat Flower run config; raises ConfigError naming the key.

        With ``preset``, the preset's values replace the defaults: a key whose value in
        ``run_config`` differs from its default was set on purpose and wins.
        """
        run_config = with_preset(run_config)
        settings = _settings()
        aliases = {alias: name for name, s in settings.items() for alias in s.aliases}
        values: dict[str, Any] = {}
        strategy_values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key.startswith(STRATEGY_PREFIX):
                strategy_values[key[len(STRATEGY_PREFIX) :]] = value
                continue
            attr = key.replace("-", "_")
            if key in aliases:
                new = aliases[key]
                warnings.warn(
                    f"run-config key {key!r} is deprecated; use {_kebab(new)!r}",
                    FutureWarning,
                    stacklevel=2,
                )
                attr = new
            elif attr not in settings:
                raise ConfigError(
                    f"unknown run-config key {key!r}; known keys: {sorted(map(_kebab, settings))}"
                )
            values[attr] = _checked(_kebab(attr), value, settings[attr], _types()[attr])
        values["strategy"], values["strategy_params"] = _strategy(strategy_values)
        cfg = cls(**values)
        cfg._check_together()
        return cfg

    def _check_together(self) -> None:
        """Rules that involve several keys."""
        if self.engine == "integer":
            recipe = LowPrecision.from_roles(
                self.role_bits(), block=self.block_kind, rounding=self.rounding
            )
            blockers = integer_blockers(recipe)
            if blockers:
                raise ConfigError(
                    "run-config engine = 'integer' cannot run this recipe: "
                    + "; ".join(blockers)
                    + " (engine = 'auto' runs it on the emulated engine)"
                )
        if self.partitioner == "iid":
            return
        if not self.alpha > 0:
            raise ConfigError(
                f"run-config alpha = {self.alpha!r} must be > 0 for partitioner "
                f"{self.partitioner!r} ('iid' ignores alpha)"
            )

    @property
    def client_evaluation(self) -> bool:
        """Whether clients evaluate the global model on a local hold-out."""
        return float(self.strategy_params.get("fraction-evaluate", 0.0)) > 0

    @property
    def block_kind(self) -> str | int:
        """``block`` as the quantizer takes it (a decimal string becomes an int)."""
        return parse_block(self.block)

    @property
    def upload_block_kind(self) -> str | int:
        """The upload's block: ``upload-block``, else ``block``."""
        return parse_block(self.upload_block) if self.upload_block != "" else self.block_kind

    @property
    def upload_rounding_kind(self) -> str:
        """The upload's rounding: ``upload-rounding``, else ``rounding``."""
        return self.upload_rounding or self.rounding

    @property
    def downlink_block_kind(self) -> str | int:
        """The quantized downlink's block: ``downlink-block``, else ``block``."""
        return parse_block(self.downlink_block) if self.downlink_block != "" else self.block_kind

    def role_bits(self, node: NodeConfig | None = None) -> dict[str, int]:
        """Word length of each of :data:`ROLES` (32: FP32), for ``node`` if given.

        Most specific first: the node's ``<role>-bits``, the node's ``bits``, the run's
        ``<role>-bits``, the run's ``bits``.
        """
        own = node.precision if node is not None else {}
        return {
            role: own.get(f"{role}-bits")
            or own.get("bits")
            or getattr(self, f"{role}_bits")
            or self.bits
            for role in ROLES
        }

    def upload_bits_of(self, node: NodeConfig | None = None) -> int:
        """The upload's word length: ``upload-bits``, else the weights' (the node's if set)."""
        own = node.precision if node is not None else {}
        if own:
            return own.get("upload-bits") or self.role_bits(node)["weight"]
        return self.upload_bits or self.role_bits()["weight"]


@dataclass(frozen=True)
class NodeConfig:
    """What one SuperNode's ``--node-config`` says: its data partition and its precision.

    ``precision`` holds the node's own word lengths, any of :data:`NODE_PRECISION_KEYS`:
    ``bits`` (every role), ``<role>-bits`` (one role) and ``upload-bits``, e.g. a 4-bit
    board in an 8-bit federation (32 makes it an FP32 node). A node that sets any of them
    uploads at its own weight bits unless it sets ``upload-bits``.
    """

    partition_id: int
    num_partitions: int
    precision: Mapping[str, int] = field(default_factory=dict)

    @property
    def bits(self) -> int | None:
        """The node's ``bits``, if it sets them."""
        return self.precision.get("bits")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        """Read and check a node config; raises ConfigError naming the key."""
        try:
            partition_id = node_config["partition-id"]
            num_partitions = node_config["num-partitions"]
        except KeyError as err:
            raise ConfigError(
                f"node config has no {err.args[0]!r}: start the SuperNode with "
                '--node-config "partition-id=0 num-partitions=N"'
            ) from None
        for key, value in (("partition-id", partition_id), ("num-partitions", num_partitions)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"node config {key}={value!r} must be an int")
        if num_partitions < 1 or not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"node config partition-id={partition_id} is outside [0, {num_partitions})"
            )
        precision = {}
        for key in NODE_PRECISION_KEYS:
            if key in node_config:
                try:
                    precision[key] = check_bits(
                        node_config[key], what=f"node config {key}", allow_fp32=True
                    )
                except ValueError as err:
                    raise ConfigError(str(err)) from None
        known = ("partition-id", "num-partitions", *NODE_PRECISION_KEYS)
        unknown = sorted(set(node_config) - set(known))
        if unknown:
            raise ConfigError(f"node config has unknown keys {unknown}; known: {list(known)}")
        return cls(partition_id, num_partitions, precision)


def preset_folders() -> list[Path]:
    """Where presets are looked up: ``conf/`` of the app (a FAB, a source checkout), then
    ``fedlpt/conf/`` (an installed wheel)."""
    here = Path(__file__).resolve().parent
    return [here.parent / "conf", here / "conf"]


def available_presets() -> list[str]:
    """Names of the presets found, sorted."""
    return sorted({p.stem for folder in preset_folders() for p in folder.glob("*.toml")})


def load_preset(name: str) -> dict[str, Any]:
    """The flat run-config keys of preset ``name``; ConfigError names the ones available."""
    for folder in preset_folders():
        path = folder / f"{name}.toml"
        if path.is_file():
            with open(path, "rb") as handle:
                values = _flatten(tomllib.load(handle))
            if "preset" in values:
                raise ConfigError(f"preset {name!r} ({path}) may not name another preset")
            return values
    raise ConfigError(
        f"run-config preset = {name!r} is not a preset; available: {available_presets()} "
        f"(looked in {[str(f) for f in preset_folders()]})"
    )


def with_preset(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``run_config`` with its ``preset`` applied under the keys set on purpose."""
    name = run_config.get("preset", "")
    if not name:
        return dict(run_config)
    if not isinstance(name, str):
        raise ConfigError(f"run-config preset = {name!r} must be a string")
    defaults = default_run_config()
    chosen = {k: v for k, v in run_config.items() if k not in defaults or v != defaults[k]}
    return {**run_config, **load_preset(name), **chosen}


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``, as Flower flattens run configs."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_run_config() -> dict[str, Any]:
    """The defaults as a flat Flower run config: exactly what ``pyproject.toml`` declares."""
    config = {
        _kebab(f.name): f.default
        for f in fields(AppConfig)
        if f.metadata.get("setting") is not None
    }
    config[STRATEGY_PREFIX + "name"] = AppConfig.strategy
    config.update({STRATEGY_PREFIX + k: v for k, v in COMMON_PARAMS.items()})
    for name, entry in STRATEGIES.items():
        config.update({f"{STRATEGY_PREFIX}{name}.{k}": v for k, v in entry.params.items()})
    return config


def describe_keys() -> list[tuple[str, Any, str]]:
    """``(key, default, help)`` of every run-config key, in declaration order."""
    rows = []
    for f in fields(AppConfig):
        setting = f.metadata.get("setting")
        if setting is not None:
            rows.append((_kebab(f.name), f.default, setting.help))
    return rows


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _settings() -> dict[str, Setting]:
    return {f.name: f.metadata["setting"] for f in fields(AppConfig) if f.metadata["setting"]}


def _types() -> dict[str, Any]:
    return typing.get_type_hints(AppConfig)


def _checked(key: str, value: Any, setting: Setting, kind: Any) -> Any:
    """``value`` converted to the key's type and checked; ConfigError otherwise."""
    value = _typed(key, value, kind)
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"run-config {key} = {value!r} must be one of {list(setting.choices)}")
    if setting.check is not None and (rule := setting.check(value)) is not None:
        raise ConfigError(f"run-config {key} = {value!r} {rule}")
    return value


def _typed(key: str, value: Any, kind: Any) -> Any:
    """Ints are accepted where floats are expected; nothing else is converted."""
    allowed = typing.get_args(kind) or (kind,)
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int):
        if int in allowed:
            return value
        if float in allowed:
            return float(value)
    elif isinstance(value, float):
        if float in allowed:
            return value
        if int in allowed and value.is_integer():
            return int(value)
    elif isinstance(value, str) and str in allowed:
        return value
    expected = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(
        f"run-config {key} = {value!r} has type {type(value).__name__}, expected {expected}"
    )


def _strategy(values: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The strategy's name and its parameters from the ``strategy.*`` keys.

    ``strategy.<param>`` goes to every strategy, ``strategy.<name>.<param>`` only to
    strategy ``<name>``.
    """
    name = values.get("name", AppConfig.strategy)
    if not isinstance(name, str):
        raise ConfigError(f"run-config strategy.name = {name!r} must be a string")
    try:
        chosen = strategy_key(name)
    except ValueError as err:
        raise ConfigError(f"run-config strategy.name: {err}") from None
    common: dict[str, Any] = {}
    own: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key == "name":
            continue
        owner, _, param = key.partition(".")
        if param:
            if owner not in STRATEGIES:
                raise ConfigError(
                    f"run-config strategy.{key}: no strategy {owner!r}; known: {sorted(STRATEGIES)}"
                )
            own.setdefault(owner, {})[param] = value
        else:
            common[key] = value
    return chosen, {**common, **own.get(chosen, {})}


def keys_markdown() -> str:
    """The table of every run-config key, as docs/configuration.md holds it."""
    lines = [
        "# Run configuration",
        "",
        "Every key of `[tool.flwr.app.config]` in `pyproject.toml`, generated from",
        "`fedlpt/config.py` by `python -m fedlpt.config > docs/configuration.md` (a test keeps",
        'the two in step). Set them with `flwr run . --run-config "key=value ..."`, start',
        "from a preset with `preset='<name>'` (the files in `conf/`), or pass a TOML file with",
        "`-c`. A value fedlpt cannot use stops the run at once, with one line naming the key,",
        "the value and what is allowed.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, help_text in describe_keys():
        shown = "`true`" if default is True else "`false`" if default is False else f"`{default!r}`"
        lines.append(f"| `{key}` | {shown.replace(chr(39), chr(34))} | {help_text} |")
    lines += [
        '| `strategy.name` | `"fedavg"` | the Flower strategy: '
        + ", ".join(f"`{name}`" for name in STRATEGIES)
        + " |",
    ]
    lines += [
        f"| `strategy.{key}` | `{value!r}` | every strategy's `{key.replace('-', '_')}` |"
        for key, value in COMMON_PARAMS.items()
    ]
    for name, entry in STRATEGIES.items():
        lines += [
            f"| `strategy.{name}.{key}` | `{value!r}` | {entry.flower_class}'s "
            f"`{key.replace('-', '_')}` |"
            for key, value in entry.params.items()
        ]
    lines += [
        "",
        "Any other argument of a Flower strategy can be given as `strategy.<argument>` (all",
        "strategies) or `strategy.<name>.<argument>` (one), kebab-case, once it is declared in",
        "`pyproject.toml`.",
        "",
        "A SuperNode's `--node-config` takes `partition-id` and `num-partitions` (which part of",
        "the data it holds) and, optionally, its own precision: "
        + ", ".join(f"`{key}`" for key in NODE_PRECISION_KEYS)
        + " (2..16, or 32 for FP32).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(keys_markdown(), end="")
