"""Pipeline loading: the miniature world, a hub id (SD v1.4 / v1.5) or any local diffusers folder.

Why a module of its own: weights must be located and hashed before anything is generated (the hash is part of
every key), a missing model must fail in seconds with one line instead of a traceback wall, and the pipeline is
loaded at most once per process and only when something actually has to be computed.

Hardware knobs of a model config, and which of them enter product keys (through :attr:`ModelHandle.identity`):

- ``dtype`` (``auto`` | ``float32`` | ``float16`` | ``bfloat16``): the precision every weight and activation is
  rounded to, so it changes pixels well beyond rounding noise: the resolved dtype is in every key. ``auto`` is
  float16 on CUDA and float32 elsewhere; float16 on a CPU is refused (slow or unsupported kernels), bfloat16 on a
  CPU runs but is warned as slow.
- ``attention`` (``sdpa`` | ``eager``), ``compile`` and ``vae_slicing``: not in any key, recorded in
  :attr:`ModelHandle.description` (the results' provenance). Each computes the same function in another order:
  SDPA's fused kernels (``AttnProcessor2_0``) against diffusers' explicit softmax(QK^T)V (``AttnProcessor``, what
  ``set_default_attn_processor`` installs), Inductor's fused kernels against eager PyTorch, one image at a time
  through the VAE decoder against the whole batch. That is the same kind of difference as the generation batch size,
  which is not in the keys either (pixels move by at most a couple of levels in 255, tests/runners/test_generate.py
  and test_models.py). Keying them would make a speed knob recompute the whole store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from crt_bench.spec import SCHEDULERS, HarnessError
from runners.store import Store

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ATTENTION = ("sdpa", "eager")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
VARIANT_INFIX = re.compile(r"\.(fp16|fp32|bf16|ema|non_ema)\.")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelUnavailable(HarnessError):
    pass


def numerics_versions() -> dict[str, str]:
    """Library versions whose changes alter pixels; part of every image and artifact key."""
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of ``model.dtype`` on ``device``: ``auto`` is float16 on CUDA (SD's half-precision
    practice) and float32 elsewhere; float16 on a CPU is refused with one line, bfloat16 there is warned as slow."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise HarnessError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise HarnessError("model.dtype=float16 on a CPU: half precision is slow or unsupported there; pass "
                           "model.dtype=auto (float16 on CUDA, float32 on a CPU) or model.dtype=float32")
    if device.type == "cpu" and dtype == torch.bfloat16:
        log.warning("model.dtype=bfloat16 on a CPU: supported but slow; model.dtype=auto computes in float32 there")
    return dtype


@dataclass(frozen=True)
class PipelineOptions:
    """Speed and memory knobs applied to a loaded pipeline; none enters a key (see the module docstring)."""

    attention: str = "sdpa"  # sdpa: AttnProcessor2_0 | eager: diffusers' default AttnProcessor
    compile: bool = False  # torch.compile of the UNet in place (nn.Module.compile), compiled on its first call
    vae_slicing: bool = False  # decode one image at a time: lower peak memory for large batches

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PipelineOptions:
        """The knobs of a model config, checked up front (one line naming the key)."""
        attention = cfg.get("attention") or "sdpa"
        if attention not in ATTENTION:
            raise HarnessError(f"model.attention={attention!r} is not one of {', '.join(ATTENTION)}")
        flags = {key: False if cfg.get(key) is None else cfg.get(key) for key in ("compile", "vae_slicing")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise HarnessError(f"model.{key}={value!r} must be true or false")
        return cls(attention=attention, **flags)


def apply_options(pipe: Any, options: PipelineOptions) -> None:
    """Set the attention processors of the UNet and VAE, VAE slicing and compilation through diffusers' and torch's
    own APIs. ``nn.Module.compile`` compiles in place, so parameter names, ``state_dict`` keys and deep copies (every
    weight-editing CRT copies the UNet) stay those of the uncompiled module, unlike the ``torch.compile(module)``
    wrapper (``_orig_mod.`` prefixes). The text encoder keeps transformers' own attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("unet", "vae"):
        component = getattr(pipe, name, None)
        if component is None or not hasattr(component, "set_attn_processor"):
            continue
        if options.attention == "eager":
            component.set_default_attn_processor()
        else:
            component.set_attn_processor(AttnProcessor2_0())
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.compile:
        pipe.unet.compile()


@dataclass(frozen=True)
class ModelLocation:
    """Where the weights are: a local folder, found directly or through the hub cache."""

    folder: Path
    source: str  # "local" | "hub"
    hub_id: str | None = None
    revision: str | None = None


def locate_model(cfg: dict[str, Any], root: Path) -> ModelLocation:
    """Find the pipeline folder for a model config, downloading from the hub if needed and allowed.

    Fails with :class:`ModelUnavailable` (one line naming the model and how to pass a local folder).
    """
    name, path = cfg.get("name", "?"), str(cfg["path"])
    for candidate in (path, cfg.get("fallback_path")):
        if candidate and (_local(candidate, root) / "model_index.json").is_file():
            folder = _local(candidate, root)
            if candidate != path:
                log.warning("model %s: %s not found, using %s", name, path, folder)
            return ModelLocation(folder.resolve(), "local")
    if not HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise ModelUnavailable(
            f"model {name!r}: no diffusers pipeline folder at {_local(path, root)}; pass "
            f"model.path=/path/to/local/diffusers/folder" + (" (or train it: make world)" if name == "mini" else ""))
    return _download(cfg, path)


def _local(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _download(cfg: dict[str, Any], hub_id: str) -> ModelLocation:
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import constants

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the hub client's retry chatter would bury the one line below
    try:
        folder = DiffusionPipeline.download(hub_id, revision=cfg.get("revision"), variant=cfg.get("variant"),
                                            use_safetensors=cfg.get("use_safetensors"))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes the same actionable line
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and the weights are not in the local hub cache"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise ModelUnavailable(
            f"could not load model {hub_id!r} from the Hugging Face hub or its local cache ({reason}); "
            f"pass model.path=/path/to/local/diffusers/folder") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    folder = Path(folder)
    return ModelLocation(folder, "hub", hub_id, folder.name)


def pipeline_files(folder: Path, variant: str | None) -> list[Path]:
    """The files ``from_pretrained`` reads: model_index.json, component configs and the chosen weights format.

    Hashing only these keeps the identity stable when a hub cache holds extra variants next to them.
    """
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelUnavailable(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                               f"pass model.path=/path/to/local/diffusers/folder")
    components = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is not None]
    files = [index]
    for component in sorted(components):
        sub = folder / component
        if not sub.is_dir():
            continue
        entries = sorted(p for p in sub.rglob("*") if p.is_file() and not p.name.startswith("."))
        files += [p for p in entries if not p.name.endswith(WEIGHT_SUFFIXES)]
        files += _chosen_weights([p for p in entries if p.name.endswith(WEIGHT_SUFFIXES)], variant)
    return files


def _chosen_weights(weights: list[Path], variant: str | None) -> list[Path]:
    if variant:
        chosen = [p for p in weights if f".{variant}." in p.name]
        if chosen:
            weights = chosen
    else:
        weights = [p for p in weights if not VARIANT_INFIX.search(p.name)]
    safetensors = [p for p in weights if p.suffix == ".safetensors"]
    return safetensors or weights


def weights_sha256(folder: Path, store: Store, variant: str | None = None) -> str:
    """One hash over the pipeline's files; hub blobs named by their sha256 are not re-read."""
    digest = hashlib.sha256()
    for path in pipeline_files(folder, variant):
        target = path.resolve()
        file_hash = target.name if re.fullmatch(r"[0-9a-f]{64}", target.name) else store.file_sha256(target)
        digest.update(f"{path.relative_to(folder).as_posix()}:{file_hash}\n".encode())
    return digest.hexdigest()


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the sampler keeping the model's noise schedule (its scheduler config)."""
    import diffusers

    if name not in SCHEDULERS:
        raise HarnessError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    if not isinstance(pipe.scheduler, cls):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)


@dataclass
class ModelHandle:
    """A located, hashed model; ``pipe`` loads it on first use (never when every product is already stored)."""

    cfg: dict[str, Any]
    location: ModelLocation
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype
    scheduler: str
    options: PipelineOptions = field(default_factory=PipelineOptions)
    loads: list[float] = field(default_factory=list)  # seconds per load, for the results file

    @property
    def identity(self) -> dict[str, Any]:
        """What a product made with this model depends on (not its name or where the folder lives)."""
        return {
            "weights_sha256": self.weights_sha256,
            "pipeline_class": self.cfg.get("pipeline_class", "StableDiffusionPipeline"),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device_type": self.device.type,
            "safety_checker": bool(self.cfg.get("safety_checker", False)),
        }

    @property
    def description(self) -> dict[str, Any]:
        return {"name": self.cfg.get("name"), "source": self.location.source, "hub_id": self.location.hub_id,
                "revision": self.location.revision, "path": str(self.location.folder), **self.identity,
                **asdict(self.options)}

    @cached_property
    def pipe(self) -> Any:
        import time

        start = time.perf_counter()
        pipe = load_pipeline(self.location.folder, self.cfg, self.device, self.dtype, self.options)
        set_scheduler(pipe, self.scheduler)
        self.loads.append(time.perf_counter() - start)
        log.info("loaded %s from %s in %.1f s", self.cfg.get("name"), self.location.folder, self.loads[-1])
        return pipe

    @property
    def loaded(self) -> bool:
        return "pipe" in self.__dict__


def load_pipeline(folder: Path, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype,
                  options: PipelineOptions | None = None) -> Any:
    """The real-path loader: any diffusers folder, SD safety checker off unless the config asks for it, the config's
    knobs applied (``options``, else read from ``cfg``)."""
    import diffusers

    cls = getattr(diffusers, cfg.get("pipeline_class", "StableDiffusionPipeline"))
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if cfg.get("variant"):
        kwargs["variant"] = cfg["variant"]
    components = json.loads((folder / "model_index.json").read_text())
    if "safety_checker" in components and not cfg.get("safety_checker", False):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # e.g. the advice to install accelerate, on every load
    try:
        pipe = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"could not load a {cls.__name__} from {folder} ({str(error).splitlines()[0][:160]}); "
                               f"pass model.path=/path/to/local/diffusers/folder") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    check_loaded_backbone(pipe, cfg, folder)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    apply_options(pipe, options or PipelineOptions.from_config(cfg))
    return pipe


def check_loaded_backbone(pipe: Any, cfg: dict[str, Any], folder: Path) -> None:
    """The pipeline's structure must be the backbone the config declares (plug-ins were admitted on it)."""
    from crt_bench.backbone import SD1, backbone_of

    declared, found = str(cfg.get("backbone") or SD1), backbone_of(pipe)
    if found != declared:
        raise ModelUnavailable(f"{folder} holds an {found} pipeline but model {cfg.get('name')!r} declares backbone "
                               f"{declared}; pass model.backbone={found} (or the matching model=...)")


class PipelineCache:
    """Keeps loaded models for the life of a process, so a Hydra sweep in one process loads each model once.

    An explicit object owned by the caller (run.py), not module state.
    """

    def __init__(self) -> None:
        self._handles: dict[str, ModelHandle] = {}

    def open(self, cfg: dict[str, Any], root: Path, store: Store, scheduler: str) -> ModelHandle:
        device = resolve_device(cfg.get("device", "auto"))
        dtype = resolve_dtype(cfg.get("dtype") or "float32", device)  # bad knobs fail before any download
        options = PipelineOptions.from_config(cfg)
        location = locate_model(cfg, root)
        sha = weights_sha256(location.folder, store, cfg.get("variant"))
        cache_key = f"{sha}:{device}:{dtype}:{cfg.get('pipeline_class')}:{cfg.get('safety_checker')}:{options}"
        handle = self._handles.get(cache_key)
        if handle is None:
            handle = ModelHandle(cfg, location, sha, device, dtype, scheduler, options)
            self._handles[cache_key] = handle
        elif handle.loaded:
            set_scheduler(handle.pipe, scheduler)
        handle.scheduler = scheduler
        return handle
