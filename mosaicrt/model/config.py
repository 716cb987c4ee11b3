"""Model configuration: the contract's `config.json`, presets, and the tensor layout it implies."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaicrt.errors import CheckpointError, ConfigError

MODEL_TYPE = "memory_mosaics_v2"
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
STORE_DTYPE_ALIASES = DTYPE_ALIASES | {"fp8": "float8_e4m3fn"}  # stores may also hold fp8
DTYPE_SHORT = {name: alias for alias, name in STORE_DTYPE_ALIASES.items()}  # float8_e4m3fn -> fp8
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelConfig:
    """Every field of the contract's `config.json`; all are required when read from a file."""

    vocab_size: int
    hidden_size: int  # d
    num_layers: int
    num_heads: int  # H, heads per memory
    head_dim: int  # hs
    intermediate_size: int  # d', SwiGLU hidden size
    stm_window: int = 256  # h: the STM sees the h-1 pairs before the query
    ltm_delay: int = 64  # m: the LTM sees pairs tau <= t - m
    use_ltm: bool = True
    rms_norm_eps: float = 1e-5
    key_norm_eps: float = 1e-6
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "float32"
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "head_dim",
            "intermediate_size",
            "stm_window",
            "ltm_delay",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.stm_window < 2:
            raise ConfigError(
                f"stm_window must be >= 2 (the STM holds h-1 pairs), got {self.stm_window}"
            )
        if not isinstance(self.use_ltm, bool):
            raise ConfigError(f"config field use_ltm must be true or false, got {self.use_ltm!r}")
        for name in ("rms_norm_eps", "key_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive number, got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                raise ConfigError(
                    f"config field {name} must be null or an id in [0, {self.vocab_size}), "
                    f"got {value!r}"
                )
        if self.torch_dtype not in DTYPES:
            raise ConfigError(
                f"config field torch_dtype must be one of {', '.join(DTYPES)}, "
                f"got {self.torch_dtype!r}"
            )
        if self.model_type != MODEL_TYPE:
            raise ConfigError(
                f"model_type is {self.model_type!r}; mosaicrt runs {MODEL_TYPE!r} only"
            )

    @property
    def memory_width(self) -> int:
        """H*hs: the width of one memory's keys and values."""
        return self.num_heads * self.head_dim

    @property
    def memories(self) -> tuple[str, ...]:
        """The memories of each layer, in the order of out_proj's input: STM first, then LTM."""
        return ("stm", "ltm") if self.use_ltm else ("stm",)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from a dict, rejecting unknown and missing keys by name."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown keys: {', '.join(unknown)}")
            raise ConfigError(f"config does not match the MMv2 contract ({'; '.join(parts)})")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def normalize_dtype(name: str) -> str:
    """Accept 'fp32'/'float32' style names; return the contract's spelling."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use one of fp32, fp16, bf16")
    return name


PRESETS: dict[str, ModelConfig] = {
    # A few-second model for tests: byte-level vocabulary plus BOS/EOS, short window and delay.
    "tiny": ModelConfig(
        vocab_size=258,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        head_dim=16,
        intermediate_size=192,
        stm_window=16,
        ltm_delay=8,
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),
    # The trained demo model's shape (mosaicrt train --preset demo): byte-level, ~3.7M parameters,
    # a 64-token STM window and a 16-token LTM delay; `init --preset demo` writes its weights.
    "demo": ModelConfig(
        vocab_size=258,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        head_dim=64,
        intermediate_size=640,
        stm_window=64,
        ltm_delay=16,
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),
    # ~40M parameters, the CPU benchmark shape: d=512, 8 layers, 8 heads of 64, FFN 1536, V=8192.
    "mini": ModelConfig(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        head_dim=64,
        intermediate_size=1536,
        stm_window=256,
        ltm_delay=64,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    ),
    # The paper's sizes (contract table): 16 + 16 / 32 + 32 heads of 128, LLaMA-3 vocabulary.
    "small": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=24,
        num_heads=16,
        head_dim=128,
        intermediate_size=6144,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    ),
    "large": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        head_dim=128,
        intermediate_size=14336,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    ),
}


def preset(name: str) -> ModelConfig:
    """The preset of that exact name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint or artifact directory."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(
            f"model directory {str(model_dir)!r} does not exist: "
            "pass a directory made by `mosaicrt init` or `mosaicrt export`"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: a model directory needs config.json "
            "(create one with `mosaicrt init DIR --preset tiny`)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}): restore or regenerate it"
        ) from None
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(config: ModelConfig, model_dir: str | Path) -> None:
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    (Path(model_dir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint, exactly as the contract lists them."""
    d, w, h, f = config.hidden_size, config.memory_width, config.num_heads, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, d)}
    for layer in range(config.num_layers):
        p = f"layers.{layer}"
        shapes[f"{p}.memory_norm.weight"] = (d,)
        for mem in config.memories:
            shapes[f"{p}.{mem}.key_proj.weight"] = (w, d)
            shapes[f"{p}.{mem}.key_gate.weight"] = (h, d)
            shapes[f"{p}.{mem}.key_decay.weight"] = (h, d)
            shapes[f"{p}.{mem}.value_proj.weight"] = (w, d)
            for name in (
                "value_mix",
                "value_scale",
                "bandwidth_beta0",
                "bandwidth_beta1",
                "bandwidth_alpha",
            ):
                shapes[f"{p}.{mem}.{name}"] = (h,)
        shapes[f"{p}.out_proj.weight"] = (d, w * len(config.memories))
        shapes[f"{p}.ffn_norm.weight"] = (d,)
        shapes[f"{p}.ffn.gate_proj.weight"] = (f, d)
        shapes[f"{p}.ffn.up_proj.weight"] = (f, d)
        shapes[f"{p}.ffn.down_proj.weight"] = (d, f)
    shapes["norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def parameter_count(config: ModelConfig) -> int:
    total = 0
    for shape in tensor_shapes(config).values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
