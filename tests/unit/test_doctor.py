"""``tuner doctor``: each check driven through its branches by recorded GPU states, a local hub and real disks.

This machine has no NVIDIA driver and a CPU torch, so those readings are real here; GPU machines come from the
recorded states (through the production probe on the fake NVML where CUDA_VISIBLE_DEVICES matters, or where the
command itself runs on one).
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.metadata
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_hardware import FakeNvml, recorded

from engine.cli import main
from engine.cli.doctor import render_findings
from engine.config.schema import build_config
from engine.doctor import (GIB, INFO, OK, PROBLEM, WARNING, Finding, TorchInfo, check_bitsandbytes,
                           check_bitsandbytes_installed, check_disk, check_driver, check_extras, check_hub, check_token,
                           check_torch_gpus, has_problem, hub_needs, torch_info, torch_install)
from engine.hardware import NO_GPU, probe

REPO = Path(__file__).resolve().parents[2]
CPU_TORCH = TorchInfo(version="2.5.1+cpu", cuda=None, cuda_available=False, device_count=0)
SECRET = "hf_doctorTestSecretToken123"


def cuda_torch(cuda: str, devices: int) -> TorchInfo:
    return TorchInfo(version="2.7.0", cuda=cuda, cuda_available=devices > 0, device_count=devices)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.server.head_seen.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    """A hub stand-in on 127.0.0.1 (listening once constructed); ``head_seen`` is set when a HEAD reaches it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.head_seen = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(autouse=True)
def _all_gpus_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_cpu_torch_on_a_gpu_machine_is_a_problem_fixed_by_the_wheel_for_the_driver():
    finding = check_driver(recorded("a100-80gb"), CPU_TORCH)
    assert finding.state == PROBLEM
    assert "driver 550.54.15 (supports CUDA 12.4)" in finding.detail and "CPU build" in finding.detail
    assert finding.fix == ("pip uninstall -y torch && "
                           "pip install torch --index-url https://download.pytorch.org/whl/cu124")


def test_torch_built_for_a_newer_cuda_than_the_driver_is_a_problem():
    finding = check_driver(recorded("8x-h100"), cuda_torch("12.8", 0))
    assert finding.state == PROBLEM
    assert "built for CUDA 12.8" in finding.detail and "upgrade the NVIDIA driver" in finding.detail
    assert finding.fix.endswith("--index-url https://download.pytorch.org/whl/cu121")


def test_driver_older_than_every_torch_wheel_says_upgrade_the_driver():
    old = recorded("a100-80gb")
    old.cuda_version = "11.4"
    finding = check_driver(old, cuda_torch("11.8", 0))
    assert (finding.state, finding.fix) == (PROBLEM, "upgrade the NVIDIA driver to one for CUDA 11.8")


def test_torch_cuda_within_what_the_driver_supports_is_ok():
    finding = check_driver(recorded("2x-rtx-4090"), cuda_torch("12.1", 2))
    assert (finding.state, finding.fix) == (OK, None)
    assert finding.detail == "driver 550.120 (supports CUDA 12.4); torch 2.7.0 built for CUDA 12.1"


@pytest.mark.parametrize(("driver_cuda", "command"), [
    ("12.4", "pip install torch --index-url https://download.pytorch.org/whl/cu124"),
    ("12.5", "pip install torch --index-url https://download.pytorch.org/whl/cu124"),
    ("12.2", "pip install torch --index-url https://download.pytorch.org/whl/cu121"),
    ("13.1", "pip install torch --index-url https://download.pytorch.org/whl/cu130"),
    (None, "pip install torch"),
    ("11.4", None),
])
def test_torch_install_picks_the_newest_wheel_the_driver_runs(driver_cuda, command):
    assert torch_install(driver_cuda, replace=False) == command


def test_no_driver_with_this_machines_cpu_torch_is_a_warning_not_a_problem():
    torch = torch_info()
    assert torch is not None and torch.cuda is None  # this machine: a CPU build
    finding = check_driver(probe(), torch)
    assert finding.state == WARNING
    assert finding.detail.startswith("no NVIDIA GPU found (") and f"torch {torch.version} is a CPU build" in (
        finding.detail)
    assert check_torch_gpus(probe(), torch, os.environ) == Finding("torch", OK, "no GPU: torch runs on the CPU")


def test_cuda_visible_devices_hiding_every_gpu_is_a_problem(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hw = probe(FakeNvml(recorded("2x-rtx-4090")))
    assert hw.gpus == [] and hw.driver_version == "550.120"
    finding = check_torch_gpus(hw, cuda_torch("12.4", 0), os.environ)
    assert finding == Finding("torch", PROBLEM, "CUDA_VISIBLE_DEVICES='' hides every GPU",
                              "unset CUDA_VISIBLE_DEVICES")


def test_cuda_visible_devices_choosing_gpus_is_said(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    hw = probe(FakeNvml(recorded("2x-rtx-4090")))
    finding = check_torch_gpus(hw, cuda_torch("12.4", 1), os.environ)
    assert finding == Finding("torch", OK, "torch sees the 1 GPU(s) (CUDA_VISIBLE_DEVICES='1' chooses them)")


def test_torch_seeing_fewer_gpus_than_nvml_is_a_warning():
    finding = check_torch_gpus(recorded("8x-h100"), cuda_torch("12.1", 4), {})
    assert (finding.state, finding.detail) == (WARNING, "torch sees 4 GPU(s), NVML 8")


def test_cuda_torch_that_cannot_reach_the_gpus_and_cpu_torch_are_problems():
    unavailable = check_torch_gpus(recorded("a100-80gb"), cuda_torch("12.4", 0), {})
    assert unavailable.state == PROBLEM and "torch.cuda.is_available() is False" in unavailable.detail
    cpu = check_torch_gpus(recorded("a100-80gb"), CPU_TORCH, {})
    assert cpu.state == PROBLEM and cpu.fix.endswith("/whl/cu124")


def test_torch_version_and_cuda_build_are_read_from_its_files_as_torch_itself_says():
    import torch

    expected = TorchInfo(version=torch.__version__, cuda=torch.version.cuda, cuda_available=None, device_count=None)
    assert torch_info() == expected
    assert torch_info(see_gpus=True) == expected  # a CPU build: there is nothing for torch to see


def test_bitsandbytes_installed_is_found_without_loading_it_and_says_how_to_load_it():
    version = importlib.metadata.version("bitsandbytes")
    assert check_bitsandbytes_installed(on_gpu=False) == Finding(
        "bitsandbytes", OK, f"bitsandbytes {version} installed; not loaded: `tuner doctor --full` loads it")
    on_gpu = check_bitsandbytes_installed(on_gpu=True)
    assert on_gpu.detail.endswith("`tuner doctor --full` loads it and its CUDA library")
    missing = check_bitsandbytes_installed(on_gpu=True, find_spec=lambda module: None)
    assert missing == Finding("bitsandbytes", PROBLEM, "bitsandbytes is not installed", "pip install -U bitsandbytes")


def test_bitsandbytes_imports_on_this_cpu_machine():
    finding = check_bitsandbytes(on_gpu=False)
    assert finding == Finding("bitsandbytes", OK, f"bitsandbytes {importlib.metadata.version('bitsandbytes')}; "
                              "torch sees no GPU: QLoRA runs on the CPU too")


def test_bitsandbytes_whose_cuda_library_fails_is_a_problem_with_its_first_line():
    def broken(on_gpu):
        assert on_gpu
        raise RuntimeError("CUDA Setup failed despite GPU being available.\nPlease run python -m bitsandbytes")

    finding = check_bitsandbytes(on_gpu=True, load=broken)
    assert finding == Finding("bitsandbytes", PROBLEM, "bitsandbytes' CUDA library does not work: CUDA Setup failed "
                              "despite GPU being available.", "pip install -U bitsandbytes")


def test_missing_extras_are_warnings_with_pip_commands_on_a_gpu_and_ok_without_one():
    on_gpu = check_extras(on_gpu=True, find_spec=lambda module: None)
    assert [(f.check, f.state, f.fix) for f in on_gpu] == [
        ("flash-attn", WARNING, "pip install flash-attn --no-build-isolation"),
        ("liger-kernel", WARNING, "pip install liger-kernel"),
        ("deepspeed", WARNING, "pip install deepspeed")]
    assert "faster attention" in on_gpu[0].detail and "ZeRO" in on_gpu[2].detail
    assert {f.state for f in check_extras(on_gpu=False, find_spec=lambda module: None)} == {OK}


def test_installed_extra_shows_its_version():
    findings = check_extras(True, find_spec=lambda m: object() if m == "flash_attn" else None,
                            version=lambda dist: {"flash-attn": "2.7.4"}[dist])
    assert findings[0] == Finding("flash-attn", OK, "flash-attn 2.7.4 installed (flash-attention-2: faster attention)")


def test_disk_places_on_one_filesystem_are_one_finding_with_real_usage(tmp_path):
    places = {"current directory": tmp_path, "run index": tmp_path / "state" / "tuner-tui",
              "Hugging Face cache": tmp_path / "hf" / "hub"}
    (finding,) = check_disk(places)
    assert str(tmp_path / "hf" / "hub") in finding.detail and "run index" in finding.detail
    free = float(finding.detail.split(" GiB")[0])
    assert free == pytest.approx(os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / GIB, abs=0.2)


@pytest.mark.parametrize(("free_gib", "state"), [(1.5, PROBLEM), (12.0, WARNING), (25.0, OK)])
def test_disk_thresholds(tmp_path, free_gib, state):
    (finding,) = check_disk({"current directory": tmp_path, "Hugging Face cache": tmp_path / "hub"},
                            usage=lambda path: SimpleNamespace(free=free_gib * GIB))
    assert finding.state == state
    assert finding.detail.startswith(f"{free_gib:.1f} GiB free for the current directory {tmp_path}")
    if state == PROBLEM:
        assert "output_dir=" in finding.fix and "export HF_HOME=" in finding.fix
    else:
        assert finding.fix is None


def test_hub_that_answers_a_head_request_is_ok(hub):
    finding = check_hub({"HF_ENDPOINT": _url(hub)})
    assert hub.head_seen.wait(5)
    assert finding.state == OK and finding.detail.startswith(f"{_url(hub)} answers (HTTP 200, ")


def _closed_port() -> int:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        return closed.getsockname()[1]


def test_hub_refusing_or_silent_is_a_warning_naming_what_needs_it():
    refused = check_hub({"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    assert refused.state == WARNING and "HF_HUB_OFFLINE=1" in refused.fix
    assert refused.detail.endswith(": hub models and datasets not in the cache, and `tuner download`, need it; the "
                                   "demo models and local models and data work without it")
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        finding = check_hub({"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}, timeout=0.3)
    assert finding.state == WARNING and "does not answer within 0.3 s" in finding.detail


def test_offline_mode_is_a_note_said_without_reaching_the_hub():
    finding = check_hub({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert finding == Finding("hub", INFO, "offline mode (HF_HUB_OFFLINE=1): hub models and datasets come from the "
                              "local cache only; the demo models and local models and data work without it")


def test_hub_needs_names_an_uncached_hub_model_and_hub_datasets_never_the_demo_or_local_ones(tiny_models):
    assert hub_needs(build_config({"model_name_or_path": "tiny-llama", "dataset": "demo_alpaca"})) == []
    assert hub_needs(build_config({"model_name_or_path": str(tiny_models["tiny-mistral"]),
                                   "dataset": "demo_alpaca"})) == []
    assert hub_needs(build_config({"model_name_or_path": "llama2-7b", "dataset": "demo_alpaca,someone/chats",
                                   "eval_dataset": "someone/chats"})) == [
        "the model llama2-7b (not in the local cache)", "the hub dataset someone/chats"]


def test_token_presence_is_said_and_the_token_never_shown():
    from_env = check_token({"HF_TOKEN": SECRET}, SECRET)
    saved = check_token({}, SECRET)
    missing = check_token({}, None)
    assert (from_env.state, saved.state, missing.state) == (OK, OK, WARNING)
    assert all(SECRET not in f.detail for f in (from_env, saved, missing))
    assert "hf auth login" in missing.detail


def test_render_puts_each_fix_under_its_problem():
    findings = [Finding("hub", PROBLEM, "down", "export HF_HUB_OFFLINE=1"), Finding("disk", OK, "plenty")]
    assert has_problem(findings) and not has_problem(findings[1:])
    assert render_findings(findings) == ["problem  hub   down", " " * 15 + "fix: export HF_HUB_OFFLINE=1",
                                         "ok       disk  plenty", "0 warning(s), 1 problem(s)"]


def _doctor_env(tmp_path: Path, hub) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES")}
    return {**env, "HF_ENDPOINT": _url(hub), "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf"),
            "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}


def test_tuner_doctor_on_this_cpu_machine_end_to_end(tmp_path, hub):
    done = subprocess.run([sys.executable, "-m", "engine.cli", "doctor"], cwd=tmp_path, env=_doctor_env(tmp_path, hub),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    states = {line[9:21].strip(): line[:7].strip() for line in lines[:-1]}
    assert states == {"driver": WARNING, "torch": OK, "bitsandbytes": OK, "flash-attn": OK, "liger-kernel": OK,
                      "deepspeed": OK, "disk": OK, "hub": OK, "hub token": OK}
    assert any(line.startswith("ok       hub token     a token is set (HF_TOKEN)") for line in lines)
    assert NO_GPU.split("(")[0] in lines[0]
    disk = next(line for line in lines if " disk " in line)
    assert f"current directory {tmp_path}" in disk and str(tmp_path / "hf" / "hub") in disk
    assert lines[-1] == "1 warning(s), 0 problem(s)"
    assert SECRET not in done.stdout + done.stderr


def _in_process(monkeypatch, tmp_path: Path, hub, offline: bool) -> None:
    for key, value in _doctor_env(tmp_path, hub).items():
        monkeypatch.setenv(key, value)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.chdir(tmp_path)


def test_tuner_doctor_default_imports_neither_torch_nor_bitsandbytes(tmp_path, hub):
    """The quick checks read files: a fresh interpreter ends them with no heavy library loaded (on a GPU machine
    torch would be, to see the GPUs)."""
    code = ("import sys; from engine.cli import main; code = main(['doctor']); "
            "print(code, sorted(m for m in ('torch', 'bitsandbytes', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_doctor_env(tmp_path, hub),
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-1] == "0 []", done.stdout + done.stderr
    assert "`tuner doctor --full` loads it" in done.stdout


def test_tuner_doctor_full_loads_bitsandbytes_that_the_default_only_finds(tmp_path, hub, monkeypatch, capsys):
    _in_process(monkeypatch, tmp_path, hub, offline=True)
    version = importlib.metadata.version("bitsandbytes")
    assert main(["doctor"]) == 0
    (quick,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ok       bitsandbytes")]
    assert quick.endswith(f"bitsandbytes {version} installed; not loaded: `tuner doctor --full` loads it")
    assert main(["doctor", "--full"]) == 0
    (full,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ok       bitsandbytes")]
    assert full.endswith(f"bitsandbytes {version}; torch sees no GPU: QLoRA runs on the CPU too")


def test_tuner_doctor_offline_is_a_note_and_exits_zero(tmp_path, hub, monkeypatch, capsys):
    _in_process(monkeypatch, tmp_path, hub, offline=True)
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("info     hub           offline mode (HF_HUB_OFFLINE=1): hub models and datasets come from the local "
            "cache only; the demo models and local models and data work without it") in lines
    assert not hub.head_seen.is_set()
    assert lines[-1] == "1 warning(s), 0 problem(s)"  # the driver: no NVIDIA GPU here


def test_tuner_doctor_json_with_a_silent_hub_warns_and_exits_zero(tmp_path, hub, monkeypatch, capsys):
    _in_process(monkeypatch, tmp_path, hub, offline=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert main(["doctor", "--json"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert all(set(f) == {"check", "state", "detail", "fix"} for f in findings)
    (hub_finding,) = [f for f in findings if f["check"] == "hub"]
    assert hub_finding["state"] == WARNING and "`tuner download`, need it" in hub_finding["detail"]
    assert hub_finding["fix"].startswith("export HTTPS_PROXY=")
    assert [f["check"] for f in findings if f["state"] == PROBLEM] == []


def test_tuner_doctor_exits_one_on_a_problem(tmp_path, hub, monkeypatch, capsys):
    """The recorded A100 through the production probe (NVML faked) with this machine's CPU build of torch."""
    _in_process(monkeypatch, tmp_path, hub, offline=False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(recorded("a100-80gb")))
    assert main(["doctor", "--json"]) == 1
    findings = json.loads(capsys.readouterr().out)
    assert [f["check"] for f in findings if f["state"] == PROBLEM] == ["driver", "torch"]
    assert all(f["fix"].endswith("/whl/cu124") for f in findings if f["state"] == PROBLEM)


def test_commands_keep_the_kernels_hubs_offline_notice_off_the_terminal(caplog, monkeypatch):
    """bitsandbytes asks the kernels hub for its CPU kernel when it loads on a CPU with AVX512-BF16; offline, kernels
    logs "Skipping publisher trust check for ..." to stderr, a line the exact-output tests of `tuner train` do not
    expect. Every command quiets it first."""
    import kernels  # installed with transformers
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as kernels reads it: this test never reaches the hub
    assert main(["--version"]) == 0
    with contextlib.suppress(Exception):  # not in this machine's cache: offline, it cannot be fetched
        kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)
    assert not [r for r in caplog.records if "publisher trust" in r.getMessage()]
