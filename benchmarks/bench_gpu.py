"""GPU benchmark of the Triton backend and of RedNet-50 against ResNet-50, in one run.

Every step runs in a child process under its own time limit, so that one slow step (a
compilation, a hang) cannot eat the time of the others; a step that runs out of time is
reported as such. All children share one Triton cache, emptied at the start, so the first step
measures a first use and the others reuse what it compiled. Steps, in order:

``first-step``
    A fresh process with an empty Triton cache trains RedNet-50 for two steps (batch 64,
    channels_last, bfloat16 autocast, SGD): seconds to import, build, the first step (which
    compiles every kernel variant the network needs) and the second; and the number of kernel
    variants compiled.
``layers``
    RedNet-50's involution layers at batch 64, channels_last input and pixel-major kernel, in
    bfloat16 and float32: median ms of forward, backward and forward+backward as called (host
    included), of forward+backward replayed from a CUDA graph (the GPU work alone), the
    host's Python time per forward+backward call, and a cuDNN depthwise convolution of the
    same kernel size (forward+backward) as a yardstick; the error against the float64
    reference at batch 4 first. Ratios: bfloat16 over float32, eager over graph.
``latency``
    Batch-1 inference of RedNet-50 and ResNet-50 (eval, channels_last, bfloat16 autocast):
    median ms eager and replayed from a CUDA graph; the ratio RedNet / ResNet.
``model``, ``model-compile``
    ``involution bench model --models rednet50 resnet50 --device cuda --batch-size 128 --amp
    --channels-last`` without and with ``--compile``: training and inference images per second
    and peak memory; the ratios RedNet / ResNet.
``fusion``
    Whether RedNet-50's layers should run the fused op on CUDA: RedNet-50 with the fused Triton
    passes (the layers' default) and with the composition (span convolution, kernel stored,
    plain Triton involution), and ResNet-50, trained (batch 128, bfloat16 autocast,
    channels_last) in alternating rounds: images per second per round, peak memory, and the
    GPU time per step (the kernels' self CUDA time in ``torch.profiler`` over three steps).
    Where the GPU time is well below the step time, the step is bound by the host.
``rule``
    Checks the launcher's strip-length rule (``ops/triton/launch.py``): forward+backward ms of
    each layer with ROWS forced to each length the rule may pick.
``nchw``
    The same layers with NCHW input and contiguous kernel (the strided path), against
    channels_last.

Results are printed as tables and written to ``<out-dir>/bench_gpu.md`` (and ``.json``), with
the date, GPU and command. ``--dry-run`` runs every step on the CPU at toy sizes (the Triton
steps under the interpreter), to check the script itself without a GPU.

Usage (the default steps take up to 12 minutes; where one command may run 10 at most, run
them as two, into two output folders):
    PYTHONPATH=src python benchmarks/bench_gpu.py --out-dir bench-out
    PYTHONPATH=src python benchmarks/bench_gpu.py --steps first-step layers latency rule --out-dir a
    PYTHONPATH=src python benchmarks/bench_gpu.py --steps model model-compile --out-dir b
    PYTHONPATH=src python benchmarks/bench_gpu.py --steps fusion --out-dir c   # not by default
    PYTHONPATH=src python benchmarks/bench_gpu.py --dry-run --out-dir dry
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports: the first step counts them

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STEPS = ("first-step", "layers", "latency", "rule", "model", "model-compile", "nchw", "fusion")
DEFAULT_STEPS = STEPS[:-2]
# Seconds each step may take, start-up and compilation included: the first four together stay
# under 6 minutes, the two model steps too.
TIMEOUTS = {
    "first-step": 75,
    "layers": 110,
    "latency": 60,
    "rule": 120,
    "model": 120,
    "model-compile": 240,
    "nchw": 120,
    "fusion": 150,
}
# RedNet-50's involution layers: (name, channels, input size, kernel size, stride); 16 channels
# per group. The stem's 3x3 involution, then the 7x7 one of each stage (stride 2 in the first
# block of stages 2-4).
LAYERS = [
    ("stem 32@112 k3", 32, 112, 3, 1),
    ("s1 64@56", 64, 56, 7, 1),
    ("s2 128@56 /2", 128, 56, 7, 2),
    ("s2 128@28", 128, 28, 7, 1),
    ("s3 256@28 /2", 256, 28, 7, 2),
    ("s3 256@14", 256, 14, 7, 1),
    ("s4 512@14 /2", 512, 14, 7, 2),
    ("s4 512@7", 512, 7, 7, 1),
]
# --dry-run: the same code at sizes the interpreter gets through in seconds.
DRY_LAYERS = [("dry 16@5 k3 /2", 16, 5, 3, 2)]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Untimed calls before each measurement; --dry-run takes one.
WARMUP = 5


# ----------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 50) -> float:
    """Median milliseconds of ``fn()`` after WARMUP calls (CUDA events on the GPU)."""
    for _ in range(WARMUP):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def host_ms(fn: Callable[[], object], device: torch.device, calls: int = 50) -> float:
    """Milliseconds of host (Python) time per call: calls issued back to back, without waiting
    for the GPU in between. Below the GPU time per call this is hidden; above it, it is the
    floor of the eager op."""
    fn()
    _sync(device)
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    spent = time.perf_counter() - begin
    _sync(device)
    return spent / calls * 1e3


def _training_step(model, batch: int, size: int, device: torch.device) -> Callable[[], None]:
    """One SGD training step of ``model`` (channels_last) on random images and labels."""
    images = torch.randn(batch, 3, size, size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # bfloat16 autocast on the GPU; the CPU of --dry-run runs float32.
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def graph_ms(fn: Callable[[], object], device: torch.device, repeats: int = 50) -> float | None:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (the GPU work alone); None on
    the CPU."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, device, repeats)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


# ------------------------------------------------------------------------------- step: layers


def _layer_inputs(layer, batch, dtype, device, channels_last=True, seed=0):
    from involution.functional import output_size

    _, channels, size, k, s = layer
    groups = channels // 16
    out = output_size((size, size), (k, k), (s, s), (k // 2, k // 2), (1, 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    w = torch.randn(batch, groups, k * k, *out, generator=gen) / k
    g = torch.randn(batch, channels, *out, generator=gen)
    x, w, g = (t.to(device=device, dtype=dtype) for t in (x, w, g))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
        # The pixel-major view of a channels_last span convolution's output.
        w = (
            w.reshape(batch, groups * k * k, *out)
            .contiguous(memory_format=torch.channels_last)
            .view(w.shape)
        )
    return x, w, g


def _involution_fns(layer, x, w, g):
    from involution.functional import involution2d

    _, _, _, k, s = layer
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return involution2d(x, w, k, s, backend="triton")

    y = involution2d(x, w, k, s, backend="triton")

    def bwd():
        return torch.autograd.grad(y, (x, w), g, retain_graph=True)

    def both():
        return torch.autograd.grad(involution2d(x, w, k, s, backend="triton"), (x, w), g)

    return fwd, bwd, both


def _relative_error(layer, batch, dtype, device) -> float:
    """Largest error of output and both gradients against the float64 reference, relative to
    the largest reference value."""
    from involution.functional import involution2d

    _, _, _, k, s = layer
    x, w, g = _layer_inputs(layer, batch, dtype, device)
    results = []
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        xi = x.to(cast).requires_grad_()
        wi = w.to(cast).requires_grad_()
        y = involution2d(xi, wi, k, s, backend=backend)
        results.append((y, *torch.autograd.grad(y, (xi, wi), g.to(cast))))
    worst = 0.0
    for a, b in zip(*results, strict=True):
        error = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)
        worst = max(worst, error.item())
    return worst


def run_layers(args, device) -> dict:
    layers = DRY_LAYERS if args.dry_run else LAYERS
    batch = 1 if args.dry_run else 64
    repeats = 1 if args.dry_run else 50
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for layer in layers:
            error = _relative_error(layer, 1 if args.dry_run else 4, dtype, device)
            x, w, g = _layer_inputs(layer, batch, dtype, device)
            fwd, bwd, both = _involution_fns(layer, x, w, g)
            conv_weight = torch.randn(layer[1], 1, layer[3], layer[3], device=device, dtype=dtype)
            xc = x.detach().requires_grad_()

            def conv_both(xc=xc, weight=conv_weight, layer=layer):
                out = F.conv2d(xc, weight, stride=layer[4], padding=layer[3] // 2, groups=layer[1])
                return torch.autograd.grad(out, xc, torch.ones_like(out))

            rows.append(
                {
                    "layer": layer[0],
                    "dtype": dtype_name,
                    "rel_error": error,
                    "fwd_ms": median_ms(fwd, device, repeats),
                    "bwd_ms": median_ms(bwd, device, repeats),
                    "fwd_bwd_ms": median_ms(both, device, repeats),
                    "fwd_bwd_graph_ms": graph_ms(both, device, repeats),
                    "fwd_bwd_host_ms": host_ms(both, device, repeats),
                    "dwconv_fwd_bwd_ms": median_ms(conv_both, device, repeats),
                }
            )
            del x, w, g, fwd, bwd, both
    return {"rows": rows}


def report_layers(result: dict) -> list[str]:
    rows = result["rows"]
    by_key = {(r["layer"], r["dtype"]): r for r in rows}
    header = ["layer", "dtype", "err", "fwd", "bwd", "fwd+bwd", "graph", "host/call"]
    header += ["eager/graph", "dwconv", "vs dwconv", "fp32/bf16"]
    table = []
    for r in rows:
        fp32 = by_key.get((r["layer"], "float32"))
        speedup = (
            _ratio(fp32["fwd_bwd_ms"], r["fwd_bwd_ms"]) if fp32 and r["dtype"] != "float32" else ""
        )
        table.append(
            [
                r["layer"],
                r["dtype"],
                f"{r['rel_error']:.1e}",
                _fmt(r["fwd_ms"]),
                _fmt(r["bwd_ms"]),
                _fmt(r["fwd_bwd_ms"]),
                _fmt(r["fwd_bwd_graph_ms"]),
                _fmt(r["fwd_bwd_host_ms"]),
                _ratio(r["fwd_bwd_ms"], r["fwd_bwd_graph_ms"]),
                _fmt(r["dwconv_fwd_bwd_ms"]),
                _ratio(r["dwconv_fwd_bwd_ms"], r["fwd_bwd_ms"]),
                speedup,
            ]
        )
    return [
        "RedNet-50 involution layers, batch 64, channels_last input, pixel-major kernel: median "
        "ms as called (host included); graph = forward+backward replayed from a CUDA graph (GPU "
        "work alone); host/call = Python time per forward+backward; vs dwconv = how many times "
        "faster than a depthwise convolution of the same kernel size; fp32/bf16 = float32 time "
        "over bfloat16 time; err = max relative error against the float64 reference.",
        *_table(header, table),
    ]


# ------------------------------------------------------------------------- step: rule, nchw


def run_rule(args, device) -> dict:
    from involution.ops.triton import launch

    layers = DRY_LAYERS if args.dry_run else LAYERS
    batch = 1 if args.dry_run else 64
    repeats = 1 if args.dry_run else 30
    original = launch.strip_rows
    rows = []
    try:
        for dtype_name, dtype in DTYPES.items():
            for layer in layers:
                height = -(-layer[2] // layer[4])  # output rows
                row = {"layer": layer[0], "dtype": dtype_name, "rule": original(height)}
                for strip in launch.STRIP_ROWS:
                    launch.strip_rows = lambda height, strip=strip: strip
                    launch._PLANS.clear()
                    _, _, both = _involution_fns(layer, *_layer_inputs(layer, batch, dtype, device))
                    row[f"rows{strip}_ms"] = median_ms(both, device, repeats)
                rows.append(row)
    finally:
        launch.strip_rows = original
        launch._PLANS.clear()
    return {"rows": rows}


def report_rule(result: dict) -> list[str]:
    from involution.ops.triton import launch

    header = ["layer", "dtype", "rule picks", *(f"ROWS={r}" for r in launch.STRIP_ROWS), "best"]
    table = []
    for r in result["rows"]:
        times = {s: r[f"rows{s}_ms"] for s in launch.STRIP_ROWS}
        best = min(times, key=times.__getitem__)
        table.append([r["layer"], r["dtype"], r["rule"], *(_fmt(t) for t in times.values()), best])
    return [
        "Strip-length rule: forward+backward median ms with ROWS forced (channels_last, batch 64)",
        *_table(header, table),
    ]


def run_nchw(args, device) -> dict:
    layers = DRY_LAYERS if args.dry_run else LAYERS
    batch = 1 if args.dry_run else 64
    repeats = 1 if args.dry_run else 30
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for layer in layers:
            row = {"layer": layer[0], "dtype": dtype_name}
            for name, channels_last in (("nchw", False), ("cl", True)):
                inputs = _layer_inputs(layer, batch, dtype, device, channels_last=channels_last)
                row[f"{name}_ms"] = median_ms(_involution_fns(layer, *inputs)[2], device, repeats)
            rows.append(row)
    return {"rows": rows}


def report_nchw(result: dict) -> list[str]:
    table = [
        [
            r["layer"],
            r["dtype"],
            _fmt(r["nchw_ms"]),
            _fmt(r["cl_ms"]),
            _ratio(r["nchw_ms"], r["cl_ms"]),
        ]
        for r in result["rows"]
    ]
    return [
        "Layouts: forward+backward median ms, NCHW (strided path) and channels_last (vector path)",
        *_table(["layer", "dtype", "nchw", "channels_last", "nchw/cl"], table),
    ]


# ----------------------------------------------------------------------------- step: latency


def run_latency(args, device) -> dict:
    from involution import create_model

    size = 32 if args.dry_run else 224
    repeats = 1 if args.dry_run else 100
    rows = []
    for name in ("rednet50", "resnet50"):
        model = create_model(name).to(device).eval()
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        image = torch.randn(1, 3, size, size, device=device)
        image = image.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if device.type == "cuda"
            else contextlib.nullcontext()
        )

        def infer(model=model, image=image, autocast=autocast):
            with torch.no_grad(), autocast:
                return model(image)

        rows.append(
            {
                "model": name,
                "eager_ms": median_ms(infer, device, repeats),
                "graph_ms": graph_ms(infer, device, repeats),
            }
        )
        del model
    return {"rows": rows}


def report_latency(result: dict) -> list[str]:
    rows = {r["model"]: r for r in result["rows"]}
    red, res = rows["rednet50"], rows["resnet50"]
    table = [
        [name, _fmt(r["eager_ms"]), _fmt(r["graph_ms"]), _ratio(r["eager_ms"], r["graph_ms"])]
        for name, r in rows.items()
    ]
    table.append(
        [
            "rednet50 / resnet50",
            _ratio(red["eager_ms"], res["eager_ms"]),
            _ratio(red["graph_ms"], res["graph_ms"]),
            "",
        ]
    )
    return [
        "Batch-1 inference latency (eval, channels_last, bfloat16 autocast): median ms",
        *_table(["model", "eager", "CUDA graph", "eager/graph"], table),
    ]


# -------------------------------------------------------------------------- step: first-step


def run_first_step(args, device) -> dict:
    phases: dict[str, object] = {"import_s": time.perf_counter() - _STARTED}
    from involution import create_model

    begin = time.perf_counter()
    name, batch, size = ("rednet26", 2, 32) if args.dry_run else ("rednet50", 64, 224)
    phases.update(model=name, batch=batch, image_size=size)
    model = create_model(name).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    step = _training_step(model, batch, size, device)
    _sync(device)
    phases["build_s"] = time.perf_counter() - begin
    for phase in ("first_step_s", "second_step_s"):
        begin = time.perf_counter()
        step()
        _sync(device)
        phases[phase] = time.perf_counter() - begin
    phases["to_first_step_end_s"] = time.perf_counter() - _STARTED
    cache = Path(os.environ.get("TRITON_CACHE_DIR", ""))
    phases["compiled_variants"] = len(list(cache.glob("*/*.cubin"))) if cache.is_dir() else 0
    return phases


def report_first_step(result: dict) -> list[str]:
    keys = ["import_s", "build_s", "first_step_s", "second_step_s", "to_first_step_end_s"]
    table = [[k, _fmt(result[k], 1)] for k in keys]
    table.append(["compiled kernel variants", str(result["compiled_variants"])])
    table.append(["process wall time (parent's clock)", _fmt(result.get("wall_s"), 1)])
    return [
        f"First use: a fresh process, empty Triton cache, {result['model']} training (batch "
        f"{result['batch']}, {result['image_size']}px, channels_last, bfloat16 autocast); seconds",
        *_table(["phase", "value"], table),
    ]


# ------------------------------------------------------------------------------ step: fusion


def _gpu_ms_per_step(step: Callable[[], object], device: torch.device, steps: int = 3) -> float:
    """Milliseconds of GPU kernels per call of ``step`` (self CUDA time in torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return sum(event.self_device_time_total for event in kernels) / 1e3 / steps


def run_fusion(args, device) -> dict:
    from involution import create_model, functional
    from involution.benchmark.model import benchmark_model

    batch, size = (2, 32) if args.dry_run else (128, 224)
    rounds = 1 if args.dry_run else 2
    amp = device.type == "cuda"
    native = functional.has_fused_passes
    variants = {"resnet50": native, "rednet50 fused": native}
    # The composition: the layers then take the path of a backend without fused passes.
    variants["rednet50 composed"] = lambda backend: False
    rows = []
    try:
        for round_ in range(rounds):
            for name, has_fused_passes in variants.items():
                functional.has_fused_passes = has_fused_passes
                torch.manual_seed(0)
                model = create_model(name.split()[0])
                row = benchmark_model(
                    model, batch, size, device=device, amp=amp, channels_last=True,
                    modes=("training",), warmup=3, repeats=1 if args.dry_run else 10,
                )  # fmt: skip
                rows.append({"model": name, "round": round_, **row})
        gpu_ms = {}
        for name, has_fused_passes in variants.items():
            if device.type != "cuda":
                break
            functional.has_fused_passes = has_fused_passes
            model = create_model(name.split()[0]).to(device)
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            step = _training_step(model, batch, size, device)
            for _ in range(WARMUP):
                step()
            gpu_ms[name] = _gpu_ms_per_step(step, device)
    finally:
        functional.has_fused_passes = native
    return {"batch": batch, "amp": amp, "rows": rows, "gpu_ms": gpu_ms}


def report_fusion(result: dict) -> list[str]:
    names = list(dict.fromkeys(r["model"] for r in result["rows"]))
    by_name = {n: [r for r in result["rows"] if r["model"] == n] for n in names}
    base = by_name["resnet50"]
    table = []
    for name in names:
        runs = by_name[name]
        step_ms = 1e3 * result["batch"] / statistics.median(r["training_img_s"] for r in runs)
        table.append(
            [
                name,
                ", ".join(_fmt(r["training_img_s"], 0) for r in runs),
                ", ".join(
                    _ratio(r["training_img_s"], b["training_img_s"])
                    for r, b in zip(runs, base, strict=True)
                ),
                _fmt(runs[-1]["training_peak_mib"], 0),
                _ratio(runs[-1]["training_peak_mib"], base[-1]["training_peak_mib"]),
                _fmt(step_ms, 1),
                _fmt(result["gpu_ms"].get(name), 1),
            ]
        )
    return [
        f"Fused against composed RedNet-50 layers, training (batch {result['batch']}, "
        f"{'bfloat16 autocast' if result['amp'] else 'float32'}, channels_last), rounds "
        "alternating; ratios against ResNet-50 of the same round",
        *_table(
            [
                "model",
                "img/s per round",
                "/ resnet50",
                "peak MiB",
                "/ resnet50",
                "step ms (median)",
                "GPU ms per step",
            ],
            table,
        ),
    ]


# ------------------------------------------------------------------------ step: model (CLI)


def model_command(args, compile: bool, output: Path) -> list[str]:
    command = [sys.executable, "-m", "involution", "bench", "model", "--models", "rednet50"]
    command += ["resnet50", "--format", "json", "--output", str(output)]
    if args.dry_run:
        command += ["--device", "cpu", "--batch-size", "2", "--image-size", "32"]
        command += ["--warmup", "1", "--repeats", "1", "--channels-last"]
    else:
        command += ["--device", "cuda", "--batch-size", "128", "--amp", "--channels-last"]
    if compile:
        command.append("--compile")
    return command


def report_model(result: dict, compile: bool) -> list[str]:
    rows = {r["model"]: r for r in result["rows"]}
    columns = ["training_img_s", "training_peak_mib", "inference_img_s", "inference_peak_mib"]
    table = [[name, *(_fmt(r.get(c), 1) for c in columns)] for name, r in rows.items()]
    if {"rednet50", "resnet50"} <= rows.keys():
        red, res = rows["rednet50"], rows["resnet50"]
        table.append(["rednet50 / resnet50", *(_ratio(red.get(c), res.get(c)) for c in columns)])
    title = "torch.compile" if compile else "eager"
    return [
        f"`{result['command']}` ({title}): images/s and peak MiB",
        *_table(["model", "train img/s", "train MiB", "infer img/s", "infer MiB"], table),
    ]


# ---------------------------------------------------------------------------------- plumbing


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    """A Markdown table."""
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


CHILD_STEPS: dict[str, Callable] = {
    "first-step": run_first_step,
    "layers": run_layers,
    "latency": run_latency,
    "rule": run_rule,
    "nchw": run_nchw,
    "fusion": run_fusion,
}
REPORTS: dict[str, Callable] = {
    "first-step": report_first_step,
    "layers": report_layers,
    "latency": report_latency,
    "rule": report_rule,
    "nchw": report_nchw,
    "fusion": report_fusion,
}


def _child_env(args, cache: Path) -> dict[str, str]:
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_step(args, step: str, cache: Path, work: Path) -> tuple[dict | None, str]:
    """Runs one step in a child process under its time limit; (result or None, status)."""
    output = work / f"{step}.json"
    if step in ("model", "model-compile"):
        command = model_command(args, step == "model-compile", output)
    else:
        command = [sys.executable, __file__, "--child", step, "--result", str(output)]
        command += ["--dry-run"] if args.dry_run else []
    timeout = args.timeout.get(step, 600 if args.dry_run else TIMEOUTS[step])
    begin = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=_child_env(args, cache), timeout=timeout, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    wall = time.perf_counter() - begin
    if done.returncode != 0 or not output.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return None, f"failed (exit {done.returncode}): " + " / ".join(tail)
    result = json.loads(output.read_text())
    result["wall_s"] = wall
    if step in ("model", "model-compile"):
        result["command"] = shlex.join(["involution", *command[3:]])
    return result, f"done in {wall:.0f} s"


def _timeouts(text: list[str]) -> dict[str, int]:
    timeouts = {}
    for item in text:
        step, _, seconds = item.partition("=")
        if step not in STEPS or not seconds.isdigit():
            raise SystemExit(f"--timeout ({item!r}) must be STEP=SECONDS with STEP in {STEPS}")
        timeouts[step] = int(seconds)
    return timeouts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench-gpu-results"))
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(DEFAULT_STEPS))
    parser.add_argument(
        "--timeout", nargs="*", default=[], metavar="STEP=SECONDS", help="override a time limit"
    )
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--child", choices=list(CHILD_STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        global WARMUP
        WARMUP = 1
    if args.child:
        args.result.write_text(json.dumps(CHILD_STEPS[args.child](args, device)))
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (or --dry-run)")
    args.timeout = _timeouts(args.timeout)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.out_dir / "steps"
    work.mkdir(exist_ok=True)
    cache = args.out_dir / "triton-cache"
    if "first-step" in args.steps:
        shutil.rmtree(cache, ignore_errors=True)  # the first step measures a first use

    from involution.benchmark.report import environment

    env = environment(device)
    lines = [
        "# bench_gpu.py",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- device: {env.get('gpu', env['device'])}; cpu: {env['cpu']} ({env['cpu_cores']} cores)",
        f"- torch {torch.__version__}; triton {_triton_version()}",
        f"- command: {shlex.join(['python', *sys.argv])}",
        "",
    ]
    results = {}
    for step in args.steps:
        result, status = run_step(args, step, cache, work)
        print(f"[{step}] {status}", flush=True)
        lines.append(f"## {step}: {status}")
        if result is not None:
            results[step] = result
            section = (
                report_model(result, step == "model-compile")
                if step.startswith("model")
                else REPORTS[step](result)
            )
            lines += ["", *section]
            print("\n".join(section), flush=True)
        lines.append("")
    (args.out_dir / "bench_gpu.md").write_text("\n".join(lines))
    (args.out_dir / "bench_gpu.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out_dir / 'bench_gpu.md'}")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
