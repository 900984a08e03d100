"""``tuner doctor``: what this machine lacks for a first run (driver and torch, GPUs, optional kernels, disk, the hub).

Each check is a function of its inputs (the NVML state, torch's versions, disk usage, the environment), so tests drive
every branch; ``run_checks`` gathers the real inputs. A finding is ok, a note (info), a warning, or a problem with the
command that fixes it. The default checks read files and metadata and take well under two seconds; importing torch
(only to ask what it sees of the GPUs NVML found) and loading bitsandbytes (``--full``) take seconds each.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.hardware import GIB, HardwareState
from engine.models.download import DEFAULT_ENDPOINT, TRUE_VALUES, hub_cache_dir

OK, INFO, WARNING, PROBLEM = "ok", "info", "warning", "problem"
WARN_FREE_GIB = 20.0  # a 7B model in 16 bits is ~13 GiB, before checkpoints
PROBLEM_FREE_GIB = 2.0
HUB_TIMEOUT_S = 3.0
TORCH_INDEX = "https://download.pytorch.org/whl/"
TORCH_CUDA_WHEELS = ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")  # the CUDA builds PyTorch publishes
FULL = "tuner doctor --full"
WITHOUT_HUB = "the demo models and local models and data work without it"


@dataclasses.dataclass
class Finding:
    check: str
    state: str  # ok | info | warning | problem
    detail: str
    fix: str | None = None


@dataclasses.dataclass
class TorchInfo:
    version: str
    cuda: str | None  # torch.version.cuda; None for a CPU build
    cuda_available: bool | None  # None: not asked (torch not imported: NVML found no GPU, or torch is a CPU build)
    device_count: int | None


@dataclasses.dataclass
class Extra:
    """An optional package: what it gives a run, and how to install it."""

    dist: str
    module: str
    gives: str
    install: str


EXTRAS = (
    Extra("flash-attn", "flash_attn", "flash-attention-2: faster attention",
          "pip install flash-attn --no-build-isolation"),
    Extra("liger-kernel", "liger_kernel", "liger: fused kernels, less memory", "pip install liger-kernel"),
    Extra("deepspeed", "deepspeed", "deepspeed: ZeRO for models that do not fit one GPU", "pip install deepspeed"),
)


def torch_info(see_gpus: bool = False) -> TorchInfo | None:
    """The installed torch's version and CUDA build, read from its ``version.py`` (importing torch takes seconds);
    with ``see_gpus`` and a CUDA build, torch is imported to ask what it sees. ``None`` when torch is not installed."""
    build = _torch_build()
    if build is not None and not (see_gpus and build[1]):
        return TorchInfo(version=build[0], cuda=build[1], cuda_available=None, device_count=None)
    try:
        import torch
    except ImportError:
        return None
    available = torch.cuda.is_available()
    return TorchInfo(version=torch.__version__, cuda=torch.version.cuda, cuda_available=available,
                     device_count=torch.cuda.device_count() if available else 0)


def _torch_build() -> tuple[str, str | None] | None:
    """``__version__`` and ``cuda`` from torch/version.py (the file torch.version is); ``None`` when it is not there."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    values = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and getattr(node, "value", None) is not None:
            try:
                values[target.id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    version = values.get("__version__")
    return (version, values.get("cuda")) if isinstance(version, str) else None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2])


def torch_install(driver_cuda: str | None, replace: bool) -> str | None:
    """The pip command for the newest PyTorch CUDA wheel this driver runs; ``None`` when the driver is older than all."""
    prefix = "pip uninstall -y torch && " if replace else ""  # pip keeps an installed CPU torch as "satisfied"
    if driver_cuda is None:
        return prefix + "pip install torch"  # PyPI's Linux wheel is a CUDA build
    fitting = [w for w in TORCH_CUDA_WHEELS if _version_tuple(w) <= _version_tuple(driver_cuda)]
    if not fitting:
        return None
    return f"{prefix}pip install torch --index-url {TORCH_INDEX}cu{fitting[-1].replace('.', '')}"


def check_driver(hw: HardwareState, torch: TorchInfo | None) -> Finding:
    """The NVIDIA driver and the CUDA it supports against the CUDA torch was built for."""
    driver = f"driver {hw.driver_version} (supports CUDA {hw.cuda_version or 'unknown'})"
    if torch is None:
        return Finding("driver", PROBLEM, "torch is not installed",
                       torch_install(hw.cuda_version, replace=False) or "pip install torch")
    build = f"torch {torch.version} " + (f"built for CUDA {torch.cuda}" if torch.cuda else "is a CPU build")
    if hw.driver_version is None:
        return Finding("driver", WARNING, f"{hw.message or 'no NVIDIA driver'}; {build}")
    if torch.cuda is None:
        return Finding("driver", PROBLEM, f"{driver}, but {build}: it cannot use the GPUs",
                       torch_install(hw.cuda_version, replace=True))
    if hw.cuda_version is None:
        return Finding("driver", WARNING, f"{driver}; {build}: whether they match is unknown")
    if _version_tuple(torch.cuda) > _version_tuple(hw.cuda_version):
        fix = torch_install(hw.cuda_version, replace=True)
        upgrade = f"upgrade the NVIDIA driver to one for CUDA {torch.cuda}"
        return Finding("driver", PROBLEM, f"{driver}, but {build}, newer: {upgrade}, or install the matching wheel",
                       fix or upgrade)
    return Finding("driver", OK, f"{driver}; {build}")


def check_torch_gpus(hw: HardwareState, torch: TorchInfo | None, env: Mapping[str, str]) -> Finding:
    """torch sees the GPUs NVML sees (both after CUDA_VISIBLE_DEVICES)."""
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if torch is None:
        return Finding("torch", PROBLEM, "torch is not installed", "pip install torch")
    if not hw.gpus:
        if hw.driver_version and spec is not None and spec.strip().startswith("MIG-"):
            return Finding("torch", PROBLEM, f"CUDA_VISIBLE_DEVICES={spec!r} names no MIG instance NVML lists",
                           "`nvidia-smi -L` lists each MIG instance's UUID")
        if hw.driver_version and spec is not None:
            return Finding("torch", PROBLEM, f"CUDA_VISIBLE_DEVICES={spec!r} hides every GPU",
                           "unset CUDA_VISIBLE_DEVICES")
        if hw.driver_version:
            return Finding("torch", WARNING, f"the driver is loaded but shows no GPU ({hw.message})")
        return Finding("torch", OK, "no GPU: torch runs on the CPU")
    count = len(hw.gpus)
    if torch.cuda is None:
        return Finding("torch", PROBLEM, f"torch {torch.version} is a CPU build: it sees none of the {count} GPU(s)",
                       torch_install(hw.cuda_version, replace=True))
    if not torch.cuda_available:
        return Finding("torch", PROBLEM, f"torch {torch.version} (CUDA {torch.cuda}) cannot use the GPUs: "
                       "torch.cuda.is_available() is False", torch_install(hw.cuda_version, replace=True))
    chosen = "" if spec is None else f" (CUDA_VISIBLE_DEVICES={spec!r} chooses them)"
    if torch.device_count != count:
        return Finding("torch", WARNING, f"torch sees {torch.device_count} GPU(s), NVML {count}{chosen}")
    return Finding("torch", OK, f"torch sees the {count} GPU(s){chosen}")


def load_bitsandbytes(on_gpu: bool) -> str:
    """Import bitsandbytes and, on a GPU, quantize a tensor so its CUDA library must load; returns its version."""
    import bitsandbytes

    if on_gpu:
        import torch
        from bitsandbytes.functional import quantize_4bit

        quantize_4bit(torch.ones(64, device="cuda", dtype=torch.float16))
    return bitsandbytes.__version__


def check_bitsandbytes_installed(on_gpu: bool, find_spec: Callable = importlib.util.find_spec,
                                 version: Callable[[str], str] = importlib.metadata.version) -> Finding:
    """bitsandbytes (QLoRA, 8-bit optimizers) is installed, found without importing it: loading it, and its CUDA
    library on a GPU, takes seconds and is left to ``--full``."""
    found = _installed("bitsandbytes", "bitsandbytes", find_spec, version)
    if found is None:
        return Finding("bitsandbytes", PROBLEM, "bitsandbytes is not installed", "pip install -U bitsandbytes")
    library = " and its CUDA library" if on_gpu else ""
    return Finding("bitsandbytes", OK, f"bitsandbytes {found} installed; not loaded: `{FULL}` loads it{library}")


def check_bitsandbytes(on_gpu: bool, load: Callable[[bool], str] = load_bitsandbytes) -> Finding:
    """``--full``: bitsandbytes imports, and on a GPU its CUDA library works."""
    try:
        version = load(on_gpu)
    except ImportError as exc:
        return Finding("bitsandbytes", PROBLEM, f"bitsandbytes does not import: {exc}", "pip install -U bitsandbytes")
    except Exception as exc:  # noqa: BLE001 - any failure of the native library is the finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Finding("bitsandbytes", PROBLEM, f"bitsandbytes' CUDA library does not work: {first}",
                       "pip install -U bitsandbytes")
    where = "its CUDA library works" if on_gpu else "torch sees no GPU: QLoRA runs on the CPU too"
    return Finding("bitsandbytes", OK, f"bitsandbytes {version}; {where}")


def _installed(module: str, dist: str, find_spec: Callable, version: Callable[[str], str]) -> str | None:
    """The installed version of ``dist`` when ``module`` is importable (found, not imported); else ``None``."""
    if find_spec(module) is None:
        return None
    try:
        return version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def check_extras(on_gpu: bool, find_spec: Callable = importlib.util.find_spec,
                 version: Callable[[str], str] = importlib.metadata.version) -> list[Finding]:
    """flash-attn, liger-kernel and deepspeed: installed or not; without a GPU none of them would run."""
    findings = []
    for extra in EXTRAS:
        found = _installed(extra.module, extra.dist, find_spec, version)
        if found is not None:
            findings.append(Finding(extra.dist, OK, f"{extra.dist} {found} installed ({extra.gives})"))
        elif on_gpu:
            findings.append(Finding(extra.dist, WARNING, f"{extra.dist} not installed; it gives {extra.gives}",
                                    extra.install))
        else:
            findings.append(Finding(extra.dist, OK, f"{extra.dist} not installed (it needs a GPU)"))
    return findings


def disk_places() -> dict[str, Path]:
    """Where a run writes: the current directory (runs go to ./saves), the run index, the Hugging Face cache."""
    from engine.paths import state_dir

    return {"current directory": Path.cwd(), "run index": state_dir(), "Hugging Face cache": hub_cache_dir()}


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


DISK_FIXES = {
    "current directory": "cd to a bigger disk (df -h lists them) or set output_dir=/path/on/it",
    "run index": "export XDG_STATE_HOME=/path/on/a/bigger/disk",
    "Hugging Face cache": "hf cache ls, then hf cache rm REPO; or export HF_HOME=/path/on/a/bigger/disk",
}


def check_disk(places: Mapping[str, Path], usage: Callable = shutil.disk_usage) -> list[Finding]:
    """Free space on each filesystem the places lie on, one finding per filesystem."""
    groups: dict[int, list[tuple[str, Path]]] = {}
    for name, path in places.items():
        groups.setdefault(_existing(path).stat().st_dev, []).append((name, path))
    findings = []
    for members in groups.values():
        free = usage(_existing(members[0][1])).free / GIB
        where = ", ".join(f"{name} {path}" for name, path in members)
        detail = f"{free:.1f} GiB free for the {where}"
        if free < PROBLEM_FREE_GIB:
            findings.append(Finding("disk", PROBLEM, f"{detail}: too little to download a model or save a checkpoint",
                                    "; ".join(DISK_FIXES[name] for name, _ in members)))
        elif free < WARN_FREE_GIB:
            findings.append(Finding("disk", WARNING, f"{detail}: a 7B model alone takes ~13 GiB"))
        else:
            findings.append(Finding("disk", OK, detail))
    return findings


def check_hub(env: Mapping[str, str], timeout: float = HUB_TIMEOUT_S) -> Finding:
    """Offline mode (a note), or whether the hub (HF_ENDPOINT, else huggingface.co) answers a HEAD request in time: one
    that does not is a warning, since only hub models and datasets, and `tuner download`, need it."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if env.get(name, "").upper() in TRUE_VALUES:
            return Finding("hub", INFO, f"offline mode ({name}={env[name]}): hub models and datasets come from the "
                           f"local cache only; {WITHOUT_HUB}")
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    start = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # an error page is still an answer
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Finding("hub", WARNING, f"{endpoint} does not answer within {timeout:g} s ({reason}): hub models and "
                       f"datasets not in the cache, and `tuner download`, need it; {WITHOUT_HUB}",
                       "export HTTPS_PROXY=http://PROXY:PORT if this server needs one; or export HF_HUB_OFFLINE=1 "
                       "to use the cache only")
    return Finding("hub", OK, f"{endpoint} answers (HTTP {status}, {time.monotonic() - start:.1f} s)")


def hub_needs(cfg) -> list[str]:
    """What of this run's config comes from the hub (its model when not a directory, a demo model or in the cache; each
    hub dataset): what an offline or unreachable hub keeps it from fetching. A name that resolves to nothing is left
    to the config's own checks."""
    from engine.data.registry import resolve_dataset
    from engine.errors import UserError
    from engine.models.resolve import needs_hub

    model = cfg.model
    needs = []
    if model.model_name_or_path and needs_hub(model.model_name_or_path, model.model_revision, model.cache_dir):
        needs.append(f"the model {model.model_name_or_path} (not in the local cache)")
    names = ",".join(filter(None, (cfg.data.dataset, cfg.data.eval_dataset))).split(",")
    for name in dict.fromkeys(part.strip() for part in names if part.strip()):
        try:
            if resolve_dataset(name, cfg.data.dataset_dir).load_from == "hf_hub":
                needs.append(f"the hub dataset {name}")
        except UserError:
            continue
    return needs


def saved_token() -> str | None:
    """The token huggingface_hub would send (HF_TOKEN, else the saved login)."""
    from huggingface_hub import get_token

    return get_token()


def check_token(env: Mapping[str, str], saved: str | None) -> Finding:
    """Whether a Hugging Face token is present; the token itself is never shown."""
    if env.get("HF_TOKEN"):
        return Finding("hub token", OK, "a token is set (HF_TOKEN)")
    if saved:
        return Finding("hub token", OK, "a token is saved (hf auth login)")
    return Finding("hub token", WARNING, "no Hugging Face token: gated models (Llama, Gemma, ...) will not download; "
                   "`hf auth login` saves one")


def run_checks(hw: HardwareState | None = None, full: bool = False) -> list[Finding]:
    """Every check on this machine's real inputs, the hub's answer and torch's import awaited beside the rest; ``hw``
    the GPUs already probed (the wizard's), else probed now; ``full`` also loads bitsandbytes (seconds)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        hub = pool.submit(check_hub, os.environ)
        if hw is None:
            from engine.hardware import probe

            hw = probe()
        torch = pool.submit(torch_info, see_gpus=bool(hw.gpus))  # imported only to see the GPUs NVML found
        bits = pool.submit(_loaded_bitsandbytes, hw, torch.result) if full else None
        extras, disk = check_extras(bool(hw.gpus)), check_disk(disk_places())
        token = check_token(os.environ, saved_token())
        found = torch.result()
        bitsandbytes = bits.result() if bits else check_bitsandbytes_installed(bool(hw.gpus))
        return [check_driver(hw, found), check_torch_gpus(hw, found, os.environ), bitsandbytes, *extras, *disk,
                hub.result(), token]


def _loaded_bitsandbytes(hw: HardwareState, torch: Callable[[], TorchInfo | None]) -> Finding:
    """``--full``'s bitsandbytes check, on the GPU when torch (once it answers) can use one."""
    found = torch()
    return check_bitsandbytes(bool(hw.gpus) and found is not None and bool(found.cuda_available))


def has_problem(findings: list[Finding]) -> bool:
    return any(f.state == PROBLEM for f in findings)
