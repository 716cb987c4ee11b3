"""Checkpoints: `config.json` + `model.safetensors` (or shards with an index), strictly checked.

Also the random initialisation of the paper's Tab. 6, written tensor by tensor so that even the
`large` preset never needs the whole model in memory at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mosaicrt.errors import CheckpointError
from mosaicrt.model.config import ModelConfig, load_config, save_config, tensor_shapes
from mosaicrt.model.mmv2 import MMv2
from mosaicrt.outputs import default_mode

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SHARD_BYTES = 2 * 1024**3


def init_tensor(
    name: str, shape: tuple[int, ...], config: ModelConfig, generator: torch.Generator
) -> torch.Tensor:
    """Tab. 6: clamp(N(0, sigma), +-3 sigma) weights, sigma by depth; raw bandwidth/value params."""
    d, f = config.hidden_size, config.intermediate_size
    leaf = name.rsplit(".", 1)[-1]
    constants = {
        "bandwidth_beta0": 1.5,
        "bandwidth_beta1": 1.5,
        "bandwidth_alpha": 1 / 3,
        "value_scale": 0.0,
    }
    if leaf in constants:
        return torch.full(shape, constants[leaf])
    if leaf == "value_mix":
        return torch.rand(shape, generator=generator)  # gamma ~ U(0, 1)
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        sigma = 1 / math.sqrt(2 * d)
    else:
        depth = int(name.split(".")[1]) + 1  # l + 1, l counted from 0
        fan = f if name.endswith("down_proj.weight") else d  # W_o uses d as written in Tab. 6
        sigma = 1 / math.sqrt(2 * fan * depth)
    w = torch.randn(shape, generator=generator) * sigma
    return w.clamp(-3 * sigma, 3 * sigma)


def random_tensors(config: ModelConfig, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every checkpoint tensor, initialised per Tab. 6, in contract order (fp32)."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in tensor_shapes(config).items():
        yield name, init_tensor(name, shape, config, generator)


def write_checkpoint(
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: ModelConfig,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
) -> Path:
    """Write config.json and the tensors (cast to dtype): one file, or shards plus an index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config.replace(torch_dtype=dtype or config.torch_dtype)
    torch_dtype = TORCH_DTYPES[config.torch_dtype]
    shapes = tensor_shapes(config)
    elem = torch.finfo(torch_dtype).bits // 8
    total = sum(math.prod(s) for s in shapes.values()) * elem
    shards: list[str] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
        for name, tensor in tensors:
            nbytes = tensor.numel() * elem
            if shard and shard_bytes + nbytes > max_shard_bytes:
                shards.append(_save_shard(shard, out, len(shards)))
                shard, shard_bytes = {}, 0
            shard[name] = tensor.to(torch_dtype).contiguous()
            shard_bytes += nbytes
            bar.update(nbytes)
    if shards:  # more than one shard: name them i-of-n and write the index
        shards.append(_save_shard(shard, out, len(shards)))
        _write_index(out, shards, shapes, total)
        (out / SINGLE_FILE).unlink(missing_ok=True)
    else:
        partial = out / (SINGLE_FILE + ".partial")  # renamed into place once complete
        _save_file(shard, partial)
        partial.replace(out / SINGLE_FILE)
        (out / INDEX_FILE).unlink(missing_ok=True)
    save_config(config, out)
    return out


def _save_shard(shard: dict[str, torch.Tensor], out: Path, number: int) -> str:
    name = f"shard-{number + 1:05d}.safetensors.partial"
    _save_file(shard, out / name)
    return name


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with the file mode open() would give (it writes files private)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, default_mode(0o666))


def _write_index(
    out: Path, partials: list[str], shapes: dict[str, tuple[int, ...]], total: int
) -> None:
    """Rename shards to model-0000i-of-0000n.safetensors and map every tensor to its shard."""
    weight_map = {}
    for i, partial in enumerate(partials, start=1):
        final = f"model-{i:05d}-of-{len(partials):05d}.safetensors"
        (out / partial).rename(out / final)
        with safe_open(str(out / final), framework="pt") as f:
            weight_map.update({key: final for key in f.keys()})
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: weight_map[k] for k in shapes if k in weight_map},
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(
    model: MMv2,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Save a model's weights in the contract's format."""
    state = model.state_dict()
    return write_checkpoint(iter(state.items()), model.config, out_dir, dtype, max_shard_bytes)


def _tensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index} is corrupt ({exc!r}): restore or regenerate it"
            ) from None
        files = sorted({model_dir / f for f in weight_map.values()})
    else:
        files = [model_dir / SINGLE_FILE]
    for f in files:
        if not f.is_file():
            raise CheckpointError(
                f"{f} is missing: the checkpoint is incomplete; "
                "copy the whole directory or re-create it"
            )
    return files


WEIGHT_CHECK_HINT = "or pass --no-weight-check to skip this scan"


def load_tensors(
    model_dir: str | Path, config: ModelConfig, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Read every tensor and check names, shapes and dtypes against the config, and (unless
    check_finite is False) that every value is finite."""
    model_dir = Path(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in _tensor_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is corrupt or not a safetensors file ({exc}): re-create or re-download it"
            ) from None
    check_tensors(tensors, config, model_dir)
    if check_finite:
        check_finite_tensors(tensors.items(), model_dir)
    return tensors


def check_finite_tensors(tensors, where) -> None:
    """Raise a CheckpointError naming the first tensor (name, array) that holds NaN or inf."""
    for name, tensor in tensors:
        finite = tensor.isfinite() if isinstance(tensor, torch.Tensor) else _np_isfinite(tensor)
        if not bool(finite.all()):
            bad = "NaN" if bool((tensor != tensor).any()) else "inf"
            raise CheckpointError(
                f"{where}: tensor {name} holds {bad} values: the weights are corrupt; restore or "
                f"re-create them ({WEIGHT_CHECK_HINT})"
            )


def _np_isfinite(array):
    import numpy as np

    return np.isfinite(array)


def check_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, where: Path) -> None:
    """Raise one CheckpointError naming every missing, unexpected or mismatched tensor."""
    expected = tensor_shapes(config)
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    mismatched = [
        f"{k} {tuple(tensors[k].shape)} != {v}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != v
    ]
    bad_dtype = sorted(
        f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in TORCH_DTYPES.values()
    )
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
        ("unsupported dtype", bad_dtype),
    ):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not match its config.json "
            f"({'; '.join(problems)}): use the config the weights were saved with"
        )


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    check_finite: bool = True,
) -> MMv2:
    """Load a checkpoint directory into an MMv2 in eval mode (dtype: default the checkpoint's);
    check_finite: refuse weights that hold NaN or inf (naming the tensor)."""
    config = load_config(model_dir)
    tensors = load_tensors(model_dir, config, check_finite)
    dtype = dtype or TORCH_DTYPES[config.torch_dtype]
    with torch.device("meta"):
        model = MMv2(config)
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True
    )
    return model.eval()


DEMO_DIR = Path(__file__).with_name("demo")  # the trained demo model, shipped in the package


def demo_checkpoint() -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """The packaged demo model's config and tensors (`mosaicrt init DIR --preset demo`)."""
    if not (DEMO_DIR / SINGLE_FILE).is_file():
        raise CheckpointError(
            f"the demo model's weights are missing from this installation ({DEMO_DIR}): "
            "reinstall mosaicrt, or train them with `mosaicrt train DIR --preset demo`"
        )
    config = load_config(DEMO_DIR)
    return config, iter(load_tensors(DEMO_DIR, config).items())


def random_model(config: ModelConfig, seed: int = 0) -> MMv2:
    """An MMv2 with Tab. 6 random weights (fp32, CPU)."""
    with torch.device("meta"):
        model = MMv2(config)
    model.load_state_dict(dict(random_tensors(config, seed)), strict=True, assign=True)
    return model.eval()
