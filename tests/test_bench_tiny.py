"""bench/gpu_img2img.py on tiny models on the CPU, so the GPU benchmark works before any GPU run.

Also: the same number of denoising steps in both libraries (the comparison is only fair then),
and no host–device traffic per step in the sampling loop the benchmark times, counted with the
``meta`` device standing in for the GPU (any ``.item()``/``if tensor`` or host→device copy is seen).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from underpaint.sampling.names import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_img2img.py"
HEADER = ["case", "runner", "latency s (median)", "images/s", "UNet ms/step", "peak VRAM GiB", "first call s",
          "× diffusers"]


def _bench_module():
    """The script as a module (registered, as dataclasses need, under a name of its own)."""
    name = "underpaint_bench_gpu_img2img"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: The rows of ``tiny_run``: two --optimize sets, --attention applying to both.
OPTIMIZED = ["channels_last+fused_qkv+attention=math", "fused_qkv+attention=math"]
RUNNERS = ["underpaint", *(f"underpaint+{names}" for names in OPTIMIZED), "diffusers"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One subprocess run, as a user runs it: source checkout, PYTHONPATH=src, no install; two optimized
    rows (--optimize given twice) and every row profiled."""
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cases", "sd15", "--runs", "2", "--warmup", "0",
           "--optimize", "channels_last,fused_qkv", "--optimize", "fused_qkv", "--attention", "math",
           "--profile", str(folder / "profile"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return SimpleNamespace(stdout=proc.stdout, stderr=proc.stderr, data=json.loads(out.read_text()),
                           profile=folder / "profile")


@pytest.fixture(scope="module")
def tiny_flux_run(tmp_path_factory):
    """Both FLUX cases, tiny, one timed run each (a few seconds)."""
    out = tmp_path_factory.mktemp("bench") / "flux.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cases", "flux-dev,flux-schnell", "--runs", "1", "--warmup", "0",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_table_is_printed_last(tiny_run):
    lines = tiny_run.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| sd15 |")]
    assert lines[-len(rows):] == rows and len(rows) == 4
    header = [cell.strip() for cell in lines[-len(rows) - 2].strip("|").split("|")]
    assert header == HEADER
    runners = [row.split("|")[2].strip() for row in rows]
    assert runners == RUNNERS
    assert all(len(row.strip("|").split("|")) == len(HEADER) for row in rows)


def test_json_results(tiny_run):
    data = tiny_run.data
    assert data["settings"]["steps_run"] == 19 and data["settings"]["dtype"] == "float32"
    assert data["settings"]["optimize"] == [["channels_last", "fused_qkv"], ["fused_qkv"]]
    assert {"device", "torch", "diffusers", "date"} <= data["machine"].keys()
    results = {r["runner"]: r for r in data["results"]}
    assert list(results) == RUNNERS
    for r in results.values():
        assert len(r["latencies_s"]) == 2 and r["latency_s"] > 0 and r["first_call_s"] > 0
        assert r["images_per_s"] == pytest.approx(1 / r["latency_s"])
        assert r["peak_vram_gib"] is None  # CPU
        # Both libraries run one batched (cond + uncond) UNet call per step, 19 steps.
        assert r["unet_calls_per_run"] == 19 and r["unet_ms_per_step"] > 0
    assert results["diffusers"]["vs_diffusers"] == 1.0
    under = results["underpaint"]
    assert under["vs_diffusers"] == pytest.approx(results["diffusers"]["latency_s"] / under["latency_s"])


def test_optimized_output_equals_plain(tiny_run):
    """Each --optimize set has its own output check against the plain row."""
    checks = tiny_run.data["checks"]
    assert [c["optimizations"] for c in checks] == OPTIMIZED
    for check in checks:
        assert check["passed"] and not check["lossy"]
        assert check["mean_abs"] <= 0.05  # fp32 on the CPU: only summation order changes


PROFILE_FIELDS = {"device", "wall_s", "busy_s", "busy_sum_s", "idle_fraction", "lead_s", "tail_s", "gaps_s",
                  "gaps_over_1ms", "largest_gaps_ms", "kernels", "launches", "graph_launches", "ops",
                  "host_device_syncs", "syncs", "sync_ops", "copies", "categories_s", "timed_median_s", "sync_sites",
                  "profiling_s", "file"}


def test_profile_files_and_summaries(tiny_run):
    """--profile: one text file per row in the one folder, its summary in the JSON and one log line per row."""
    files = sorted(p.name for p in tiny_run.profile.iterdir())
    assert files == sorted(["sd15--underpaint.txt", "sd15--diffusers.txt",
                            "sd15--underpaint-channels_last-fused_qkv-attention-math.txt",
                            "sd15--underpaint-fused_qkv-attention-math.txt"])
    for result in tiny_run.data["results"]:
        p = result["profile"]
        assert set(p) == PROFILE_FIELDS, set(p) ^ PROFILE_FIELDS
        assert p["device"] == "cpu" and p["kernels"] is None and p["host_device_syncs"] is None
        assert 0 < p["busy_s"] <= p["wall_s"] and 0 <= p["idle_fraction"] < 1
        assert p["idle_fraction"] == pytest.approx(1 - p["busy_s"] / p["wall_s"], abs=1e-3)
        assert p["lead_s"] >= 0 and p["tail_s"] >= 0
        idle = p["lead_s"] + p["tail_s"] + sum(p["gaps_s"].values())
        assert idle == pytest.approx(p["wall_s"] - p["busy_s"], abs=1e-4)
        assert p["ops"] > 19 * 50  # 19 UNet calls of dozens of ops each, plus the VAE and text encoder
        kinds = p["categories_s"]
        assert set(kinds) == {"convolution", "matmul/gemm", "attention", "normalization", "elementwise/other",
                              "memory copy"}
        # A UNet convolves, multiplies matrices, attends and normalises; on one CPU thread the op self
        # times add up to the time inside top-level ops.
        assert all(kinds[k] > 0 for k in ("convolution", "matmul/gemm", "attention", "normalization"))
        assert sum(kinds.values()) == pytest.approx(p["busy_s"], rel=0.05)
        assert p["timed_median_s"] == pytest.approx(result["latency_s"], abs=1e-6)
        text = (tiny_run.profile / p["file"]).read_text()
        assert f"/ {result['runner']}: one call under torch.profiler" in text
        assert "top 40 by self CPU time:" in text and "aten::" in text
        assert f"profile {result['runner']}: wall " in tiny_run.stderr


def test_tradeoff_rows_are_measured_not_judged(tmp_path):
    """--token-merging, --deepcache, --ngms and --taesd add underpaint rows whose pictures differ by design: the
    difference to the plain row is reported (lossy), and the run still passes."""
    out = tmp_path / "tradeoffs.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--cases", "sd15", "--runs", "1", "--warmup", "0",
           "--token-merging", "0.5", "--deepcache", "3", "--ngms", "2", "--taesd", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["settings"]["token_merging"] == 0.5 and data["settings"]["deepcache"] == 3
    assert data["settings"]["ngms"] == 2 and data["settings"]["taesd"] is True
    runners = [r["runner"] for r in data["results"]]
    assert runners[:2] == ["underpaint", "underpaint tome=0.5"]
    assert "underpaint deepcache=3" in runners and "underpaint ngms=2" in runners and "underpaint taesd" in runners
    checks = {c["optimizations"]: c for c in data["checks"]}
    assert set(checks) == {"tome=0.5", "deepcache=3", "ngms=2", "taesd"}
    for check in checks.values():
        assert check["lossy"] and check["passed"] and check["mean_abs"] > 0  # a different picture, reported
    assert "lossy, measured only" in proc.stdout


def test_flux_rows_and_settings(tiny_flux_run):
    proc, data = tiny_flux_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| flux-")]
    assert lines[-len(rows):] == rows
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [
        ("flux-dev", "underpaint"), ("flux-dev", "diffusers"), ("flux-schnell", "underpaint"),
        ("flux-schnell", "diffusers")]
    cases = data["cases"]
    assert (cases["flux-dev"]["steps"], cases["flux-dev"]["strength"], cases["flux-dev"]["guidance"]) == (28, 0.65, 3.5)
    assert (cases["flux-schnell"]["steps"], cases["flux-schnell"]["strength"]) == (4, 0.75)
    assert cases["flux-schnell"]["guidance"] is None
    for r in data["results"]:
        # One transformer call per step in both libraries (distilled guidance, no CFG batch).
        assert r["unet_calls_per_run"] == cases[r["case"]]["steps_run"] and r["unet_ms_per_step"] > 0


def test_flux_pictures_match_diffusers(tiny_flux_run):
    """Same weights, seed and noise; diffusers made to take the VAE posterior's mean: within 2 levels."""
    _, data = tiny_flux_run
    checks = {c["case"]: c for c in data["checks"]}
    assert set(checks) == {"flux-dev", "flux-schnell"}
    for check in checks.values():
        assert check["optimizations"] == "vs diffusers" and check["passed"]
        assert check["max_abs"] <= 2 and check["mean_abs"] < 1


@pytest.mark.parametrize(("steps", "strength"), [(28, 0.65), (4, 0.75), (10, 0.6), (20, 0.33), (7, 1.0)])
def test_flux_cases_run_the_same_steps(steps, strength):
    """diffusers' FLUX img2img starts at int(steps - steps·strength), not int(steps·strength) from the end;
    underpaint is given the strength that runs as many steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    from underpaint.sampling.schedules import img2img_steps

    bench = _bench_module()
    settings = bench.Settings(torch.device("cpu"), torch.float32, steps, strength, 1.0, 1, 0, (), False, "default",
                              guidance=3.5, flux="dev")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(steps)
    _, diffusers_steps = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    _, t_enc = img2img_steps(steps, settings.underpaint_strength, False)
    assert t_enc + 1 == diffusers_steps == settings.steps_run


@pytest.mark.parametrize(("steps", "strength"), [(30, 0.65), (2, 0.65), (20, 0.5), (50, 0.3), (30, 1.0), (7, 0.99)])
def test_both_libraries_run_the_same_steps(steps, strength):
    """underpaint's strength (A1111's count) runs as many steps as diffusers' get_timesteps at ``strength``."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    from underpaint.sampling.schedules import img2img_steps

    bench = _bench_module()
    settings = bench.Settings(torch.device("cpu"), torch.float32, steps, strength, 7.0, 1, 0, (), False, "default")
    scheduler = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    _, diffusers_steps = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    _, t_enc = img2img_steps(steps, settings.underpaint_strength, False)
    assert t_enc + 1 == diffusers_steps == settings.steps_run


def test_repeated_optimize_gives_one_row_per_set():
    """--optimize once per row (the comma form within one); --attention joins every set, and adds a row
    of its own only when no --optimize is given; the same set twice is refused."""
    bench = _bench_module()

    def rows(*argv):
        return [s.describe() for s in bench.settings_from(bench.parse_args(["--tiny", *argv])).speeds]

    assert rows() == []
    assert rows("--optimize", "channels_last,fused_qkv") == ["channels_last,fused_qkv"]
    assert rows("--optimize", "channels_last", "--optimize", "fused_qkv", "--optimize", "channels_last,fused_qkv") == [
        "channels_last", "fused_qkv", "channels_last,fused_qkv"]
    assert rows("--attention", "math") == ["attention=math"]
    assert rows("--optimize", "fused_qkv", "--optimize", "channels_last", "--attention", "math") == [
        "fused_qkv,attention=math", "channels_last,attention=math"]
    with pytest.raises(SystemExit, match="channels_last,fused_qkv given twice"):
        bench.settings_from(bench.parse_args(["--tiny", "--optimize", "channels_last,fused_qkv",
                                              "--optimize", "fused_qkv,channels_last"]))
    with pytest.raises(SystemExit, match="unknown cudagraphs"):
        bench.settings_from(bench.parse_args(["--tiny", "--optimize", "compile", "--optimize", "cudagraphs"]))


def _event(name, start, end, *, cuda=False, parent=None, thread=1, activity=None):
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    event = FunctionEvent(id=0, name=name, thread=thread, start_us=start, end_us=end, use_device="cuda",
                          device_type=DeviceType.CUDA if cuda else DeviceType.CPU,
                          activity_type=activity or ("kernel" if cuda else "cpu_op"))
    if parent is not None:
        event.set_cpu_parent(parent)
        parent.append_cpu_child(event)
    return event


def test_profile_summary_of_a_cuda_call():
    """The CUDA summary from hand-made profiler events: busy time is the union of the device intervals
    (overlapping kernels counted once), the call's own range comes from its marker, the device copy of
    that range (a GPU user annotation) is no kernel while a Triton kernel named like its CPU-side launch
    range is one, and syncs are counted with the op that issued them."""
    bench = _bench_module()
    call = _event("bench::call", 0, 1000, activity="user_annotation")
    conv = _event("aten::conv2d", 10, 100, parent=call)
    _event("cudaLaunchKernel", 20, 30, parent=conv)
    item = _event("aten::_local_scalar_dense", 500, 600, parent=call)
    sync = _event("cudaStreamSynchronize", 510, 590, parent=item)
    events = [call, conv, *conv.cpu_children, item, sync, _event("cudaDeviceSynchronize", 900, 990, parent=call),
              _event("triton_poi_fused_add_0", 40, 45, parent=call),  # inductor's launch range, an op's
              _event("triton_poi_fused_add_0", 440, 455, cuda=True),
              _event("bench::call", 50, 508, cuda=True, activity="gpu_user_annotation"),
              _event("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", 50, 250, cuda=True),
              _event("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NTN", 200, 300, cuda=True),  # overlaps the conv
              _event("Memset (Device)", 300, 302, cuda=True, activity="gpu_memset"),
              _event("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", 400, 450,
                     cuda=True),
              _event("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 460, 480, cuda=True),
              _event("Memcpy DtoH (Device -> Pageable)", 505, 508, cuda=True, activity="gpu_memcpy")]
    p = bench.profile_summary(events, cuda=True, wall_s=5.0)
    assert p["wall_s"] == pytest.approx(1000e-6)  # the marker's range, not the fallback
    # Union: [50, 302] + [400, 455] + [460, 480] + [505, 508] = 252 + 55 + 20 + 3 us; summed: 390 us.
    assert p["busy_s"] == pytest.approx(330e-6) and p["busy_sum_s"] == pytest.approx(390e-6)
    assert p["idle_fraction"] == pytest.approx(0.67)
    assert p["lead_s"] == pytest.approx(50e-6) and p["tail_s"] == pytest.approx(492e-6)
    # Gaps of 98, 5 and 25 us between the busy intervals.
    assert p["gaps_s"] == {"under_10us": pytest.approx(5e-6), "10us_to_1ms": pytest.approx(123e-6), "over_1ms": 0.0}
    assert p["largest_gaps_ms"] == [[0.302, 0.098], [0.48, 0.025], [0.455, 0.005]]
    assert (p["kernels"], p["launches"], p["graph_launches"], p["ops"]) == (5, 1, 0, 2)
    assert p["host_device_syncs"] == 2
    assert p["syncs"] == {"cudaDeviceSynchronize": 1, "cudaStreamSynchronize": 1}
    assert p["sync_ops"] == {"aten::_local_scalar_dense": 1, "(no aten op)": 1}
    assert p["copies"] == {"memset": 1, "DtoH": 1}
    assert p["categories_s"] == {"memory copy": pytest.approx(5e-6), "attention": pytest.approx(20e-6),
                                 "normalization": 0.0, "convolution": pytest.approx(200e-6),
                                 "matmul/gemm": pytest.approx(100e-6), "elementwise/other": pytest.approx(65e-6)}


@pytest.mark.parametrize(("name", "kind"), [
    ("sm90_xmma_fprop_implicit_gemm_indexed_wo_smem_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("cutlass_tensorop_f16_s16816fprop_optimized_f16_64x64_64x4_nhwc_align8", "convolution"),
    ("implicit_convolve_hhgemm", "convolution"),
    ("aten::mkldnn_convolution", "convolution"),
    ("triton_poi_fused_convolution_0", "convolution"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NTN", "matmul/gemm"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul/gemm"),
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn", "matmul/gemm"),
    ("triton_tem_fused_addmm_0", "matmul/gemm"),
    ("aten::addmm", "matmul/gemm"),
    ("aten::bmm", "matmul/gemm"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel::Params)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "attention"),
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, c10::Half, float, float>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>", "normalization"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>", "normalization"),
    ("triton_red_fused__to_copy_add_convert_element_type_native_group_norm_0", "normalization"),
    ("aten::native_group_norm", "normalization"),
    ("Memcpy HtoD (Pageable -> Device)", "memory copy"),
    ("Memset (Device)", "memory copy"),
    ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>", "memory copy"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "memory copy"),
    ("aten::copy_", "memory copy"),
    # Not what they seem by a substring: random normal noise, a dtype conversion, a plain elementwise op.
    ("void at::native::distribution_elementwise_grid_stride_kernel<float, 4, normal_and_transform>",
     "elementwise/other"),
    ("triton_poi_fused_add_convert_element_type_mul_0", "elementwise/other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise/other"),
    ("aten::silu", "elementwise/other"),
])
def test_profile_categories_by_name(name, kind):
    assert _bench_module().category(name) == kind


def test_unknown_case_and_optimization_are_refused():
    bench = _bench_module()
    with pytest.raises(SystemExit, match="unknown sd3"):
        bench.select_cases(bench.parse_args(["--cases", "sd3"]))
    # FLUX is opt-in: the default cases stay SD's three.
    assert [c.name for c in bench.select_cases(bench.parse_args([]))] == ["sd15", "sd15-b16", "sdxl"]
    with pytest.raises(SystemExit, match="unknown cudagraphs"):
        bench.settings_from(bench.parse_args(["--tiny", "--optimize", "cudagraphs"]))


def test_full_size_configs_are_the_published_architectures():
    """Parameter counts of the random-weight modules equal the released SD 1.5 / SDXL / FLUX.1 ones (meta device)."""
    bench = _bench_module()
    for arch in bench.ARCHS.values():
        bench.check_param_counts(arch)


# --- host–device traffic in the sampling loop ------------------------------------------------------


class _Transfers(TorchFunctionMode):
    """Records every device→host read (``if t``, ``.item()``, ``.tolist()`` of a tensor not in host memory)
    and cross-device copy.

    Reads of ``meta`` tensors answer a placeholder, so the loop runs on to the end. ``host``: what a
    copy of a ``meta`` tensor of its shape to the CPU answers (the sigmas the meta ones stand for).
    """

    READS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"}

    def __init__(self, host: torch.Tensor | None = None):
        super().__init__()
        self.seen: list[str] = []
        self.host = host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.host is not None and _meta_to_cpu(name, args, kwargs or {}) and args[0].shape == self.host.shape:
            self.seen.append("copy meta->cpu")
            return self.host.clone()
        if name in self.READS and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            self.seen.append(name)
            if args[0].device.type == "meta":
                return [False] * args[0].numel() if name == "tolist" else (True if name == "__bool__" else 0)
        out = func(*args, **(kwargs or {}))
        if name in {"to", "copy_"} and isinstance(out, torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            if isinstance(source, torch.Tensor) and source.device.type != out.device.type:
                self.seen.append(f"copy {source.device.type}->{out.device.type}")
        return out


def _meta_to_cpu(name: str, args: tuple, kwargs: dict) -> bool:
    if not args or not isinstance(args[0], torch.Tensor) or args[0].device.type != "meta":
        return False
    if name == "cpu":
        return True
    target = args[1] if name == "to" and len(args) > 1 else kwargs.get("device") if name == "to" else None
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def _sdxl_like_run(steps: int) -> list[str]:
    """DPM++ 2M Karras with CFG through the pipeline's denoiser, an SDXL-style stub UNet, on ``meta``."""
    from underpaint.pipeline.conditioning import CondSchedule
    from underpaint.pipeline.denoise import make_denoiser
    from underpaint.prompts.encoder import Conditioning
    from underpaint.sampling.samplers import run_sampler
    from underpaint.sampling.schedules import ModelSchedule, build_sigmas, sd_alphas_cumprod

    schedule = ModelSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    host = build_sigmas("DPM++ 2M", "Karras", steps, schedule)

    def unet(x, t, *, encoder_hidden_states, added_cond_kwargs, return_dict, **_):
        assert added_cond_kwargs["time_ids"].device.type == "meta"
        return (x * 0.5,)

    model = SimpleNamespace(unet=unet, dtype=torch.float16, spec=SimpleNamespace(prediction="eps"))
    cond = Conditioning(torch.zeros(1, 77, 16, device="meta"), torch.zeros(1, 8, device="meta"),
                        torch.zeros(1, 6, device="meta"))
    conds = CondSchedule([(10**6, cond)], [(10**6, cond)])
    denoiser = make_denoiser(model, conds, 7.0, schedule, "DPM++ 2M")
    with _Transfers(host=host) as transfers:
        run_sampler("DPM++ 2M", denoiser, torch.zeros(1, 4, 8, 8, device="meta"), host)
    return transfers.seen


def _sampler_run(label: str, steps: int) -> list[str]:
    """``label`` over ``steps`` steps through the pipeline's denoiser and a stub UNet on ``meta``, the
    sigmas given in host memory as the pipeline gives them (their copy to the CPU answered with them)."""
    from underpaint.pipeline.conditioning import CondSchedule
    from underpaint.pipeline.denoise import make_denoiser
    from underpaint.prompts.encoder import Conditioning
    from underpaint.sampling.samplers import run_sampler
    from underpaint.sampling.schedules import ModelSchedule, build_sigmas, sd_alphas_cumprod

    schedule = ModelSchedule.from_alphas_cumprod(sd_alphas_cumprod())
    host = build_sigmas(label, "Automatic", steps, schedule)

    def unet(x, t, *, encoder_hidden_states, added_cond_kwargs, return_dict, **_):
        return (x * 0.5,)

    model = SimpleNamespace(unet=unet, dtype=torch.float16, spec=SimpleNamespace(prediction="eps"))
    cond = Conditioning(torch.zeros(1, 77, 16, device="meta"), torch.zeros(1, 8, device="meta"))
    denoiser = make_denoiser(model, CondSchedule([(10**6, cond)], [(10**6, cond)]), 7.0, schedule, label)
    x = torch.zeros(1, 4, 8, 8, device="meta")
    with _Transfers(host=host) as transfers:
        run_sampler(label, denoiser, x, host, noise_sampler=lambda sigma, sigma_next: torch.zeros_like(x),
                    model_schedule=schedule)
    return transfers.seen


@pytest.mark.parametrize("label", [info.label for info in SAMPLERS if info.label != "DPM adaptive"])
def test_no_sampler_waits_for_the_device_at_each_step(label):
    """Every sampler but DPM adaptive (whose step sizes come from error estimates it must read) branches on
    a host copy of the sigmas and hands the noise sources host values: what it reads back or copies is the
    same for 3 and 9 steps, setup only."""
    short, long = Counter(_sampler_run(label, 3)), Counter(_sampler_run(label, 9))
    assert short == long, (short, long)
    assert sum(long.values()) <= 8, long  # UniPC places its own time grid and table too


class _Copies(TorchFunctionMode):
    """Records the arguments of every ``Tensor.to`` without running it (no GPU needed)."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "to":
            self.calls.append(dict(kwargs or {}))
            return args[0]
        return func(*args, **(kwargs or {}))


def test_copies_to_a_gpu_do_not_block():
    """Host → CUDA copies go non-blocking (PyTorch's blocking copy waits for the GPU's queue); every other
    direction blocks as before, where the host may read the result at once."""
    from underpaint.models.device import to_device

    host = torch.ones(3)
    with _Copies() as copies:
        to_device(host, "cuda", torch.float16)
        to_device(host, torch.device("cuda:1"))
        to_device(host, "cpu")
        to_device(torch.ones(3, device="meta"), "cuda")
        to_device(host, None, torch.float64)
    assert [c.get("non_blocking") for c in copies.calls] == [True, True, False, False, None]
    assert copies.calls[0]["dtype"] == torch.float16 and copies.calls[0]["device"] == torch.device("cuda")


def test_sampling_loop_has_no_per_step_host_device_traffic():
    """The count is the same for 2 and 12 steps: setup only (sigma flags, schedule and size ids placed once)."""
    short, long = Counter(_sdxl_like_run(2)), Counter(_sdxl_like_run(12))
    assert short == long, (short, long)
    assert sum(long.values()) <= 6, long


def test_first_image_after_restart(tmp_path):
    """bench/first_image.py: two fresh processes, the second with the first one's cache folder,
    the same pictures from both (eager backend: the script's plumbing, not inductor's speed)."""
    out = tmp_path / "first.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "bench" / "first_image.py"), "--tiny", "--optimize", "compile",
           "--compile-backend", "eager", "--runs", "2", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["identical"] and len(data["runs"]) == 2
    for run in data["runs"]:
        assert run["to_first_image_s"] == pytest.approx(run["import_s"] + run["first_s"])
        assert run["first_s"] > run["steady_s"] > 0  # the first call compiles
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "pictures identical across runs: yes" in proc.stdout


def _gpu_run_module():
    name = "underpaint_bench_gpu_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "gpu_run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_gpu_run_steps_are_valid_commands(capsys, tmp_path):
    """Every step of the one-command GPU run parses with its own script's options, as its command
    line will give them (a typo there would waste a GPU run); ``{out}`` becomes the --out folder;
    unknown step names are refused."""
    runner = _gpu_run_module()
    bench = _bench_module()
    first = importlib.util.module_from_spec(importlib.util.spec_from_file_location("first_image_check",
                                                                                 ROOT / "bench" / "first_image.py"))
    first.__spec__.loader.exec_module(first)
    profiled = []
    for step in runner.STEPS:
        cmd = runner.command(step, tmp_path)
        assert cmd[1] == str(ROOT / "bench" / step.script) and not any("{out}" in a for a in cmd)
        if step.script == "gpu_img2img.py":
            args = bench.parse_args(cmd[2:])
            bench.select_cases(args)
            settings = bench.settings_from(bench.parse_args([*cmd[2:], "--device", "cpu"]))
            if settings.profile is not None:
                assert settings.profile.parent == tmp_path  # the run's own folder, which comes back
                profiled.append(settings.profile)
        else:
            first.parse_args(cmd[2:])
    assert len(set(profiled)) == len(profiled) == 2  # graphs-profile and stub: one folder each, no file clobbered
    assert runner.main(["--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert all(f"# {step.name} " in printed for step in runner.STEPS)
    assert f"--profile {tmp_path / 'profile-graphs'} " in printed
    with pytest.raises(SystemExit, match="unknown step"):
        runner.main(["--dry-run", "--only", "tabel"])


def _fake_steps(runner, monkeypatch, steps: dict[str, tuple[float, int]]) -> None:
    """``runner``'s steps replaced by stand-ins (the runner is what is tested here; the scripts have
    tests of their own): each sleeps its seconds, prints a line and writes its --json file. ``steps``:
    name -> (seconds it runs, its limit)."""
    monkeypatch.setattr(runner, "STEPS", tuple(runner.Step(name, "gpu_img2img.py", (), limit, f"{name} step")
                                               for name, (_, limit) in steps.items()))

    def command(step, out):
        seconds = steps[step.name][0]
        code = (f"import json, time; time.sleep({seconds}); print('| {step.name} | row |'); "
                f"open({str(out / f'{step.name}.json')!r}, 'w').write(json.dumps({{'results': [1]}}))")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(runner, "command", command)


def test_gpu_run_keeps_going_past_a_stopped_step(tmp_path, monkeypatch):
    runner = _gpu_run_module()
    _fake_steps(runner, monkeypatch, {"slow": (30, 1), "quick": (0, 300), "late": (0, 10_000)})
    assert runner.main(["--out", str(tmp_path)]) == 1
    summary = {s["step"]: s for s in json.loads((tmp_path / "summary.json").read_text())}
    assert summary["slow"]["status"] == "stopped at its limit" and summary["slow"]["seconds"] < 20
    assert summary["quick"]["status"] == 0 and json.loads((tmp_path / "quick.json").read_text())["results"]
    assert summary["late"]["status"].startswith("not run")  # its limit does not fit the budget
    assert "| quick | row |" in (tmp_path / "quick.log").read_text()


def test_gpu_run_state_file_carries_on_where_a_call_stopped(tmp_path, monkeypatch, capsys):
    """A second call with the same --state leaves out the steps the first one ran, whatever
    their result, and runs the rest."""
    runner = _gpu_run_module()
    _fake_steps(runner, monkeypatch, {"first": (0, 300), "second": (0, 300)})
    state = tmp_path / "state.json"
    assert runner.main(["--out", str(tmp_path / "a"), "--state", str(state), "--only", "first"]) == 0
    assert json.loads(state.read_text()) == ["first"]
    assert runner.main(["--out", str(tmp_path / "b"), "--state", str(state)]) == 0
    assert json.loads(state.read_text()) == ["first", "second"]
    assert [s["step"] for s in json.loads((tmp_path / "b" / "summary.json").read_text())] == ["second"]
    runner.main(["--dry-run", "--state", str(state)])
    assert "# first" not in capsys.readouterr().out


def test_gpu_run_stops_a_step_with_the_processes_it_started(tmp_path, monkeypatch):
    """A step stopped at its limit does not leave a child process running on the GPU (first_image.py
    runs each restart as a child of its own)."""
    runner = _gpu_run_module()
    pid_file = tmp_path / "child.pid"
    spawn = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()")
    monkeypatch.setattr(runner, "STEPS", (runner.Step("spawns", "gpu_img2img.py", (), 3, "stopped", json=False),))
    monkeypatch.setattr(runner, "command", lambda step, out: [sys.executable, "-c", spawn])
    assert runner.main(["--out", str(tmp_path)]) == 1
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # killed, waiting for its parent's parent to reap it
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the step's child process was still running after the step was stopped")
