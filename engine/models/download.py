"""A hub model into the local Hugging Face cache as a step of its own: what it needs (the files a run loads, their
sizes from the hub's metadata, what the cache already holds), whether it may (access, disk), then the download with
progress, a stop, and a resume from the bytes already on disk.

huggingface_hub (2.x) deletes a file's partial download when it is interrupted, so each file is fetched here with
its own ``http_get`` into ``blobs/<etag>.incomplete``, kept across interruptions; ``hf_hub_download`` then links the
finished blob into the snapshot. Files go over plain HTTP (as huggingface_hub does without hf_xet).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.rundir.events import DownloadProgress  # the download event's content, in the run's format

log = logging.getLogger("tuner.download")

HUB_TIMEOUT_S = 5.0
DISK_MARGIN_BYTES = 1_000_000_000
PROGRESS_EVERY_S = 0.5
SPEED_WINDOW_S = 5.0
CHUNK_BYTES = 1 << 20  # progress and a stop are answered at least once a chunk; an interruption loses under one
DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its switches (HF_HUB_OFFLINE ...)
NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "h11", "ssl"}  # their errors

MODEL_FILES = {  # what loading a model reads besides its weights: configs, tokenizers, templates
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "model.safetensors.index.json",
}
MODEL_SUFFIXES = (".tiktoken", ".py")  # tokenizers of their own, and a trust_remote_code model's code


@dataclass(frozen=True)
class PlannedFile:
    name: str
    size: int
    blob: str | None  # the cache's name for its content (the LFS sha256 or git blob id); None when not told


@dataclass(frozen=True)
class DownloadPlan:
    """What a run of ``hub_id`` at ``revision`` (commit ``commit``) needs from the hub, and what is already here."""

    hub_id: str
    revision: str
    commit: str
    files: tuple[PlannedFile, ...]
    total_bytes: int
    missing_bytes: int  # less what the cache holds: whole files and the kept part of interrupted ones
    cache_dir: Path
    free_bytes: int
    endpoint: str | None = None

    @property
    def snapshot_dir(self) -> Path:
        return self.cache_dir / _repo_folder(self.hub_id) / "snapshots" / self.commit


class DownloadStopped(Exception):
    """The stop callable said stop: the bytes fetched so far stay on disk for the next ``download``."""

    def __init__(self, done_bytes: int, total_bytes: int):
        super().__init__(f"download stopped at {human_bytes(done_bytes)} of {human_bytes(total_bytes)}")
        self.done_bytes, self.total_bytes = done_bytes, total_bytes


def human_bytes(count: float) -> str:
    """Decimal units, as the hub shows sizes: 13.5 GB, 2.6 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, read from the environment now (the library reads it once, at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"


def hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in TRUE_VALUES


class HubUnreachable(UserError):
    """The hub cannot be asked (offline, or no answer): a caller that needs only the catalog may go on without it."""


def hub_unreachable(hub_id: str) -> HubUnreachable:
    return HubUnreachable(
        f"{hub_id} is not in the local Hugging Face cache and the hub cannot be reached",
        hint=f"download it on a connected machine (`hf download {hub_id}`) and copy the cache over, "
        "or pass a local directory",
    )


def plan_download(hub_id: str, revision: str | None = None, token: str | None = None,
                  cache_dir: str | Path | None = None, check_room: bool = True) -> DownloadPlan:
    """The files a training run of ``hub_id`` loads, checked before anything is fetched: the hub answers, the model
    may be read with this token, it ships safetensors, and (with ``check_room``) the disk holding the cache has room
    for what is missing."""
    if hub_offline():
        raise hub_unreachable(hub_id)
    revision = revision or "main"
    endpoint = os.environ.get("HF_ENDPOINT") or None
    info = _model_info(hub_id, revision, token, endpoint)
    sizes = {s.rfilename: s for s in info.siblings or []}
    names = run_files(hub_id, list(sizes))
    _check_access(hub_id, revision, token, endpoint)
    cache = Path(cache_dir).expanduser() if cache_dir else hub_cache_dir()
    files = tuple(_planned(sizes[name]) for name in names)
    held = {f.name: _held(cache, hub_id, info.sha, f) for f in files}
    _refuse_oversized(hub_id, revision, cache_dir, [f for f in files if held[f.name] < f.size])
    total = sum(f.size for f in files)
    missing = total - sum(held.values())
    plan = DownloadPlan(hub_id, revision, info.sha, files, total, missing, cache, _free_bytes(cache), endpoint)
    if check_room:
        require_room(plan)
    return plan


def _refuse_oversized(hub_id: str, revision: str, cache_dir, missing: list[PlannedFile]) -> None:
    """huggingface_hub's plain-HTTP download refuses a file over its limit (50 GB); say so before anything moves."""
    from huggingface_hub import constants

    big = [f for f in missing if f.size > constants.MAX_HTTP_DOWNLOAD_SIZE]
    if big:
        where = f" --cache-dir {cache_dir}" if cache_dir else ""
        raise UserError(f"{hub_id}'s {big[0].name} is {human_bytes(big[0].size)}, over huggingface_hub's "
                        f"{human_bytes(constants.MAX_HTTP_DOWNLOAD_SIZE)} limit for a plain HTTP download",
                        hint=f"fetch it with `hf download {hub_id} --revision {revision}{where}` (hf_xet), then run "
                        "again: the cache is used")


def run_files(hub_id: str, names: list[str]) -> list[str]:
    """The repo's files a run needs, in the order fetched: small files, the weights, config.json last (so a cache
    holding config.json holds the rest). Only top-level files: original/, onnx/, gguf and .pth copies stay behind."""
    top = [n for n in names if "/" not in n]
    if "config.json" not in top:
        hint = ("it holds a LoRA adapter: pass its base model as model_name_or_path and this as adapter_name_or_path"
                if "adapter_config.json" in top else "a transformers model ships config.json beside its weights")
        raise UserError(f"{hub_id} has no config.json", hint=hint)
    weights = [n for n in top if n.endswith(".safetensors") and not n.startswith(("consolidated", "adapter_model"))]
    if not weights:
        raise UserError(f"{hub_id} ships no safetensors weights", hint="tuner loads *.safetensors only (no pickled "
                        ".bin / .pth); choose a repo that ships them, or convert it and pass the directory")
    small = [n for n in top if n != "config.json" and (n in MODEL_FILES or n.endswith(MODEL_SUFFIXES))]
    return sorted(small) + sorted(weights) + ["config.json"]


def download(plan: DownloadPlan, progress: Callable[[DownloadProgress], None] | None = None,
             stop: Callable[[], bool] | None = None, token: str | None = None) -> Path:
    """Fetch what ``plan`` lists into the cache and return the snapshot directory. ``progress`` hears at most every
    PROGRESS_EVERY_S and at each file's end; when ``stop()`` turns true, DownloadStopped is raised and the partial
    file stays for the next call to continue."""
    from huggingface_hub import constants

    meter = _Meter(plan, progress, stop)
    chunk, constants.DOWNLOAD_CHUNK_SIZE = constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES
    failure = None
    try:
        for file in plan.files:
            meter.begin(file)
            fetched = _fetch(plan, file, meter, token)
            meter.end(file)
            if fetched:
                log.info("downloaded %s (%s)", file.name, human_bytes(file.size))
    except Exception as exc:
        if not isinstance(exc, DownloadStopped) and stop is not None and stop():
            raise DownloadStopped(meter.done, plan.total_bytes) from None  # a stop during a stalled connection
        failure = _broke_off(plan, meter.file, exc)
        if failure is None:
            raise
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = chunk
    if failure is not None:
        raise failure  # outside the except block: the user's line, not the HTTP library's chain
    _record_ref(plan)
    return plan.snapshot_dir


def _broke_off(plan: DownloadPlan, file: str, exc: Exception) -> UserError | None:
    """The user's error for a download cut short by the disk or the network (what was fetched is kept); None for
    anything else (a bug, or a stop), which travels as it is."""
    if isinstance(exc, (UserError, DownloadStopped)):
        return None
    again = f"`tuner download {plan.hub_id}` or `tuner resume RUN` continues from what was fetched"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = human_bytes(_free_bytes(plan.cache_dir))
        return UserError(f"disk full while downloading {plan.hub_id} ({file}): {free} free at {plan.cache_dir}",
                         hint=f"free space or point HF_HOME/HF_HUB_CACHE at a larger disk; {again}")
    if isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in NETWORK_MODULES:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return UserError(f"the download of {plan.hub_id} broke off at {file}: {reason}", hint=again)
    return None


def _model_info(hub_id: str, revision: str, token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi(endpoint=endpoint).model_info(hub_id, revision=revision, token=token, files_metadata=True,
                                                   timeout=HUB_TIMEOUT_S)
    except GatedRepoError as exc:
        raise _gated(hub_id, token, endpoint, exc) from None
    except RepositoryNotFoundError:
        refused = " (the token found could not see it)" if _token_present(token) else ""
        raise UserError(f"{hub_id} is not a model on the Hugging Face hub, or it is private{refused}",
                        hint="check the spelling; a private model needs a token that may read it: "
                        "`hf auth login` or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UserError(f"{hub_id} has no revision {revision}",
                        hint="model_revision takes a branch, a tag or a commit of the repo") from None
    except HfHubHTTPError as exc:  # the hub answered, with an error: an expired token, a rate limit, an outage
        raise _refused(hub_id, exc) from None
    except Exception:  # no answer: the HTTP library's exception types change between versions
        raise hub_unreachable(hub_id) from None


def _check_access(hub_id: str, revision: str, token: str | None, endpoint: str | None) -> None:
    """A gated model's metadata is public; its files answer 401 / 403 until its licence is accepted."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        get_hf_file_metadata(hf_hub_url(hub_id, "config.json", revision=revision, endpoint=endpoint), token=token,
                             timeout=HUB_TIMEOUT_S, endpoint=endpoint)
    except GatedRepoError as exc:
        raise _gated(hub_id, token, endpoint, exc) from None
    except RepositoryNotFoundError:
        raise UserError(f"{hub_id} is private: its files need a token that may read them",
                        hint="`hf auth login` or set HF_TOKEN") from None
    except HfHubHTTPError as exc:
        raise _refused(hub_id, exc) from None
    except Exception:
        raise hub_unreachable(hub_id) from None


def _refused(hub_id: str, exc) -> UserError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"the hub refused {hub_id} ({status}): {reason}",
                     hint="401: log in again (`hf auth login`) or check HF_TOKEN; 429 or 5xx: try again later")


def _gated(hub_id: str, token: str | None, endpoint: str | None, exc) -> UserError:
    page = f"{(endpoint or DEFAULT_ENDPOINT).rstrip('/')}/{hub_id}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    refused = (f"; the token found was refused ({status}): its account has no access yet"
               if _token_present(token) else "")
    return UserError(f"{hub_id} is gated{refused}",
                     hint=f"accept its licence at {page}, then `hf auth login` or set HF_TOKEN")


def _token_present(token: str | None) -> bool:
    from huggingface_hub import get_token

    return bool(token or get_token())


def _planned(sibling) -> PlannedFile:
    lfs = sibling.lfs
    size = lfs.size if lfs else sibling.size
    return PlannedFile(sibling.rfilename, int(size or 0), lfs.sha256 if lfs else sibling.blob_id)


def _repo_folder(hub_id: str) -> str:
    return "models--" + hub_id.replace("/", "--")


def _held(cache: Path, hub_id: str, commit: str, file: PlannedFile) -> int:
    """The bytes of ``file`` already in the cache: all of it, the part an interrupted download kept, or none."""
    storage = cache / _repo_folder(hub_id)
    if (storage / "snapshots" / commit / file.name).exists():
        return file.size
    if file.blob is None:
        return 0
    if (storage / "blobs" / file.blob).exists():
        return file.size
    try:
        return min((storage / "blobs" / f"{file.blob}.incomplete").stat().st_size, file.size)
    except OSError:
        return 0


def _free_bytes(cache: Path) -> int:
    """Free space on the disk that holds (or will hold) the cache directory."""
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def require_room(plan: DownloadPlan) -> None:
    """Refuse a plan whose missing bytes, and a DISK_MARGIN_BYTES margin, exceed the free space at its cache."""
    if plan.missing_bytes and plan.missing_bytes + DISK_MARGIN_BYTES > plan.free_bytes:
        short = plan.missing_bytes + DISK_MARGIN_BYTES - plan.free_bytes
        raise UserError(
            f"{plan.hub_id} needs {human_bytes(short)} more: {human_bytes(plan.missing_bytes)} to download and a "
            f"{human_bytes(DISK_MARGIN_BYTES)} margin, {human_bytes(plan.free_bytes)} free at {plan.cache_dir}",
            hint="free space or point HF_HOME/HF_HUB_CACHE at a larger disk")


def _fetch(plan: DownloadPlan, file: PlannedFile, meter: "_Meter", token: str | None) -> bool:
    """One file into the cache, continuing its kept part; whether any byte had to be fetched."""
    from urllib.parse import urlparse

    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    if (plan.snapshot_dir / file.name).exists():
        return False
    url = hf_hub_url(plan.hub_id, file.name, revision=plan.commit, endpoint=plan.endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=plan.endpoint)
    if not meta.etag:
        raise UserError(f"{plan.endpoint or DEFAULT_ENDPOINT} sent {file.name} without an ETag: it does not answer as "
                        "a Hugging Face hub", hint="check HF_ENDPOINT")
    storage = plan.cache_dir / _repo_folder(plan.hub_id)
    blob = storage / "blobs" / meta.etag
    fetched = False
    if not blob.exists():
        headers = build_hf_headers(token=token)
        if urlparse(meta.location).netloc != urlparse(url).netloc:
            headers.pop("authorization", None)  # a signed CDN address: the token stays with the hub
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock = plan.cache_dir / ".locks" / _repo_folder(plan.hub_id) / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with _blob_lock(lock, meter):  # the lock huggingface_hub takes for this blob: one writer across processes
            if not blob.exists():
                part = blob.with_name(f"{meta.etag}.incomplete")
                with open(part, "ab") as out:
                    if meta.size is not None and out.tell() > meta.size:  # more than the file: not its start
                        out.truncate(0)
                        out.seek(0)
                    meter.kept(out.tell())
                    http_get(meta.location, out, resume_size=out.tell(), headers=headers, expected_size=meta.size,
                             displayed_filename=file.name, tqdm_class=meter.bar)  # raises unless the size is right
                os.replace(part, blob)
                fetched = True
    hf_hub_download(plan.hub_id, file.name, revision=plan.commit, cache_dir=str(plan.cache_dir), token=token,
                    endpoint=plan.endpoint)  # links the blob into the plan's snapshot, even if the branch moved since
    return fetched


def _record_ref(plan: DownloadPlan) -> None:
    """``refs/<revision>`` -> the plan's commit, as huggingface_hub records a branch or tag: the cache then finds the
    snapshot by the name the user gave. Written whole (tmp + rename), so no reader sees it empty."""
    if plan.revision == plan.commit:
        return
    from engine.rundir.files import write_text_atomic

    ref = plan.cache_dir / _repo_folder(plan.hub_id) / "refs" / plan.revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ref, plan.commit)


@contextlib.contextmanager
def _blob_lock(path: Path, meter: "_Meter"):
    """The blob's lock, waited for a second at a time so a stop is answered while another process fetches it."""
    from filelock import Timeout
    from huggingface_hub.utils import WeakFileLock

    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(WeakFileLock(path, timeout=1.0))
                break
            except Timeout:
                meter.check_stop()
        yield


class _Meter:
    """Bytes done across the plan's files, the speed over the last SPEED_WINDOW_S, throttled reports, the stop."""

    def __init__(self, plan: DownloadPlan, progress, stop):
        self.plan, self.progress, self.stop = plan, progress, stop
        self.finished = 0  # bytes of the files done
        self.current = 0  # bytes of the file being fetched that are on disk
        self.file = plan.files[0].name if plan.files else ""
        self.moved = 0  # bytes transferred by this call: the speed counts these only
        self.samples: collections.deque[tuple[float, int]] = collections.deque([(time.monotonic(), 0)])
        self.last_report = -float("inf")
        meter = self

        class Bar:
            """The progress bar huggingface_hub's http_get drives, in place of tqdm."""

            def __init__(self, *, initial: int = 0, **_):
                meter.current = initial

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, count: int) -> None:
                meter.add(count)

            def close(self) -> None:
                pass

        self.bar = Bar

    @property
    def done(self) -> int:
        return self.finished + self.current

    def begin(self, file: PlannedFile) -> None:
        self.file, self.current = file.name, 0
        self.check_stop()

    def kept(self, count: int) -> None:
        self.current = count

    def add(self, count: int) -> None:
        self.current += count
        self.moved += count
        self.check_stop()
        self.report()

    def end(self, file: PlannedFile) -> None:
        self.finished += file.size
        self.current = 0
        self.report(force=True)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        self.samples.append((now, self.moved))
        while len(self.samples) > 2 and now - self.samples[1][0] >= SPEED_WINDOW_S:
            self.samples.popleft()
        if self.progress is None or (not force and now - self.last_report < PROGRESS_EVERY_S):
            return
        self.last_report = now
        first_time, first_moved = self.samples[0]
        speed = (self.moved - first_moved) / (now - first_time) if now > first_time and self.moved else None
        left = max(self.plan.total_bytes - self.done, 0)
        eta = left / speed if speed else (0.0 if not left else None)
        self.progress(DownloadProgress(min(self.done, self.plan.total_bytes), self.plan.total_bytes, speed, eta,
                                       self.file))

    def check_stop(self) -> None:
        if self.stop is not None and self.stop():
            raise DownloadStopped(self.done, self.plan.total_bytes)


def eta_clock(seconds: float | None) -> str:
    """3m56s, 1h02m; ? when not known."""
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(progress: DownloadProgress) -> str:
    """A download as one line of text: `tuner download`'s plain lines and the dashboard's before the first step."""
    p = progress
    percent = 100 * p.done_bytes / p.total_bytes if p.total_bytes else 100.0
    speed = f"{human_bytes(p.speed_bytes_s)}/s" if p.speed_bytes_s is not None else "?/s"
    return (f"{p.file}  {human_bytes(p.done_bytes)} / {human_bytes(p.total_bytes)} ({percent:.0f}%)  {speed}  "
            f"ETA {eta_clock(p.eta_s)}")
