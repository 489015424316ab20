"""Benchmark library and ``involution bench``: measurements are real, tables are well formed.

No test asserts a wall-clock time: timings are only checked to be positive and finite.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import pytest
import torch

from involution.benchmark import OpShape, benchmark_op, copy_bandwidth, measure_time, peak_memory
from involution.benchmark import op as op_module
from involution.benchmark.report import bar_chart, format_rows, format_table
from involution.cli import bench as bench_cli
from involution.cli.__main__ import main

from conftest import needs_cpu_kernels

MIB = 1 << 20


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_measure_time_counts_repeats_and_orders_statistics():
    calls = []
    timing = measure_time(
        lambda: calls.append(torch.randn(64, 64) @ torch.randn(64, 64)), "cpu", 2, 5
    )
    assert len(calls) == 7
    assert timing.repeats == 5
    assert 0 < timing.minimum <= timing.median <= timing.maximum


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"warmup": -1}, {"device": "meta"}])
def test_measure_time_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        measure_time(lambda: None, **kwargs)


def test_peak_memory_of_known_allocations():
    def work():
        a = torch.randn(MIB)  # 4 MiB live
        b = torch.randn(2 * MIB)  # 12 MiB live: the peak
        del a
        del b
        return torch.randn(MIB // 2)  # 2 MiB live at the end

    assert peak_memory(work) == pytest.approx(12 * MIB, abs=4096)
    assert peak_memory(lambda: torch.empty(1000, dtype=torch.uint8)) == 1000


def test_peak_memory_ignores_what_was_live_before_and_frees_of_it():
    before = [torch.randn(MIB) for _ in range(4)]

    def work():
        before.pop()  # frees 4 MiB that the call did not allocate
        return torch.randn(MIB // 4)

    assert peak_memory(work) == pytest.approx(MIB, abs=4096)
    assert peak_memory(lambda: None) == 0


@needs_cpu_kernels
def test_peak_memory_counts_the_cpu_kernels_large_results(monkeypatch):
    """Results with memory of their own (ops/cpu/results.py; from 2 MiB on here) are counted."""
    from involution.ops.cpu import launch, results

    monkeypatch.setattr(results, "LARGE_BYTES", 2 * MIB)
    x, grad_out = torch.randn(4, 64, 32, 32), torch.randn(4, 64, 32, 32)
    geometry = ((7, 7), (1, 1), (3, 3), (1, 1))
    nbytes = 4 * 4 * 49 * 32 * 32 * 4  # the kernel gradient, 3.1 MiB
    assert peak_memory(lambda: launch.grad_kernel(grad_out, x, *geometry, 4)) >= nbytes


def test_copy_bandwidth_is_positive():
    assert _positive(copy_bandwidth("cpu", nbytes=4 * MIB, warmup=1, repeats=2))
    with pytest.raises(ValueError, match="nbytes"):
        copy_bandwidth("cpu", nbytes=0)


@pytest.fixture(scope="module")
def op_rows():
    shape = OpShape(2, 32, 12, 10)
    return benchmark_op(
        shape,
        kernel_size=5,
        group_channels=16,
        backends=["reference", "torch"],
        baselines=["depthwise", "dense"],
        warmup=1,
        repeats=2,
        copy_bytes=4 * MIB,
    )


def test_benchmark_op_table_structure(op_rows):
    ops = ["involution[reference]", "involution[torch]", "conv2d depthwise", "conv2d dense"]
    passes = ["forward", "backward", "forward+backward"]
    assert [(r["op"], r["pass"]) for r in op_rows] == [(o, p) for o in ops for p in passes]
    for row in op_rows:
        assert row["shape"] == "2x32x12x10"
        for key in ("median_ms", "min_ms", "peak_mib", "peak_vs_operands", "moved_mb"):
            assert _positive(row[key]), (key, row)
        for key in ("gb_per_s", "copy_gb_per_s", "floor_ms", "floor_fraction", "vs_reference"):
            assert _positive(row[key]), (key, row)
        assert row["min_ms"] <= row["median_ms"]
        assert row["floor_ms"] == pytest.approx(row["moved_mb"] / row["copy_gb_per_s"])
        assert row["floor_fraction"] == pytest.approx(row["floor_ms"] / row["median_ms"])
    # The copy is timed again after each pass, not once.
    assert len({row["copy_gb_per_s"] for row in op_rows}) > 1
    assert all(r["vs_reference"] == 1.0 for r in op_rows if r["op"] == "involution[reference]")


def test_benchmark_op_bytes_moved(op_rows):
    x = 2 * 32 * 12 * 10 * 4  # float32 input; the output has the same size (stride 1)
    kernel = 2 * 2 * 25 * 12 * 10 * 4
    weight = 32 * 1 * 25 * 4
    moved = {(r["op"], r["pass"]): r["moved_mb"] * 1e6 for r in op_rows}
    assert moved["involution[torch]", "forward"] == pytest.approx(x + kernel + x)
    assert moved["involution[torch]", "backward"] == pytest.approx(x + 2 * (x + kernel))
    assert moved["conv2d depthwise", "forward+backward"] == pytest.approx(
        (2 * x + weight) + (x + 2 * (x + weight))
    )


def test_benchmark_op_memory_sees_the_unfold(op_rows):
    # The reference unfolds the input K*K = 25 times; the portable backend must not.
    peak = {(r["op"], r["pass"]): r["peak_vs_operands"] for r in op_rows}
    input_share = 1 / (1 + 2 * 25 / 16)  # input bytes over input + kernel bytes
    assert peak["involution[reference]", "forward"] >= 25 * input_share
    assert peak["involution[torch]", "forward"] < 25 * input_share / 4


def test_benchmark_op_without_bandwidth_has_no_floor():
    rows = benchmark_op(
        OpShape(1, 16, 6, 6), 3, backends=["torch"], baselines=[], passes=["forward"], repeats=1
    )
    assert len(rows) == 1
    for key in ("copy_gb_per_s", "floor_ms", "floor_fraction", "vs_reference"):
        assert rows[0][key] is None, key
    with pytest.raises(ValueError, match=r"copy_bytes \(2\) must be >= 4"):
        benchmark_op(OpShape(1, 16, 6, 6), 3, backends=["torch"], copy_bytes=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 4}, "kernel_size"),
        ({"group_channels": 5}, "group_channels"),
        ({"backends": ["nope"]}, "backends"),
        ({"baselines": ["sparse"]}, "baselines"),
        ({"passes": ["sideways"]}, "passes"),
        ({"stride": 0}, "stride"),
    ],
)
def test_benchmark_op_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        benchmark_op(OpShape(1, 16, 6, 6), **kwargs)


def test_benchmark_op_refuses_a_backend_that_cannot_run_before_measuring(monkeypatch):
    """A named backend the device or dtype rules out is refused up front, saying why."""
    measured = []
    monkeypatch.setattr(op_module, "measure_time", lambda *a, **k: measured.append(a))
    with pytest.raises(
        RuntimeError, match=r"backends \('cpu'\) cannot run on cpu in torch\.float16: cpu"
    ):
        benchmark_op(
            OpShape(1, 16, 6, 6), 3, dtype=torch.float16, backends=["torch", "cpu"],
            passes=["forward"], repeats=1,
        )  # fmt: skip
    assert measured == []


@pytest.mark.parametrize("text", ["8x64x56", "8x64x0x5", "axbxcxd", ""])
def test_op_shape_parse_rejects_bad_text(text):
    with pytest.raises(ValueError, match="BxCxHxW"):
        OpShape.parse(text)
    assert OpShape.parse("8X64x56x55") == OpShape(8, 64, 56, 55)


ROWS = [
    {"model": "a", "img_s": 12.5, "note": None},
    {"model": "bb", "img_s": 1234.5678, "note": "x"},
]


def test_format_table_aligns_columns():
    lines = format_table(ROWS).splitlines()
    assert lines[0].split() == ["model", "img_s", "note"]
    assert lines[2].split() == ["a", "12.5", "-"]
    assert lines[3].split() == ["bb", "1235", "x"]
    # Numbers align right under their header, text aligns left.
    ends = {
        line.index(word) + len(word)
        for line, word in zip(lines, ["img_s", "", "12.5", "1235"], strict=True)
        if word
    }
    assert len(ends) == 1
    assert lines[2].index("-") == lines[3].index("x") == lines[0].index("note")


def test_csv_and_json_round_trip():
    parsed = list(csv.DictReader(io.StringIO(format_rows(ROWS, "csv"))))
    assert [r["model"] for r in parsed] == ["a", "bb"]
    assert float(parsed[1]["img_s"]) == 1234.5678
    document = json.loads(format_rows(ROWS, "json", {"device": "cpu"}))
    assert document == {"metadata": {"device": "cpu"}, "rows": ROWS}
    with pytest.raises(ValueError, match="format"):
        format_rows(ROWS, "xml")


def test_bar_chart_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"shape": s, "op": o, "pass": p, "ms": float(i + 1)}
        for i, (s, o, p) in enumerate(
            (s, o, p) for s in ("A", "B") for o in ("x", "y") for p in ("f", "b")
        )
    ]
    path = bar_chart(rows, tmp_path / "chart.png", "ms", "shape", "op", "pass", log=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_op_json(tmp_path, capsys):
    out = tmp_path / "op.json"
    code = main(
        [
            "bench", "op", "--shapes", "1x16x7x9", "--kernel-size", "3", "--device", "cpu",
            "--backends", "torch", "--baselines", "depthwise", "--passes", "forward",
            "forward+backward", "--warmup", "1", "--repeats", "1", "--copy-mib", "4",
            "--format", "json", "--output", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    document = json.loads(out.read_text())
    assert all(_positive(row["copy_gb_per_s"]) for row in document["rows"])
    assert document["metadata"]["cpu_cores"] >= 1
    assert [(r["op"], r["pass"]) for r in document["rows"]] == [
        ("involution[torch]", "forward"),
        ("involution[torch]", "forward+backward"),
        ("conv2d depthwise", "forward"),
        ("conv2d depthwise", "forward+backward"),
    ]
    assert all(_positive(r["floor_fraction"]) for r in document["rows"])


@pytest.mark.parametrize(
    ("argv", "measure"),
    [
        (["op", "--shapes", "1x16x6x6", "2x16x5x5", "--kernel-size", "3", "--backends", "torch",
          "--baselines", "--copy-mib", "0"], "op_bench.benchmark_op"),
        (["model", "--models", "rednet26_cifar", "resnet26_cifar", "--model-arg",
          "base_width=16", "--batch-size", "2", "--image-size", "32", "--modes", "training"],
         "model_bench.benchmark_model"),
    ],
)  # fmt: skip
def test_cli_bench_cpu_measures_with_freed_memory_kept(argv, measure, tmp_path, monkeypatch):
    # As fit() trains: every measurement runs inside keep_freed_memory, which is left afterwards,
    # and the metadata says what it yielded.
    state = {"inside": False, "entered": 0, "measured_inside": 0, "measured": 0, "kept": None}
    real_keep = bench_cli.keep_freed_memory
    module_name, function_name = measure.split(".")
    module = getattr(bench_cli, module_name)
    real_measure = getattr(module, function_name)

    @contextlib.contextmanager
    def keep(*args):
        state["entered"] += 1
        with real_keep(*args) as kept:
            state["inside"], state["kept"] = True, kept
            try:
                yield kept
            finally:
                state["inside"] = False

    def spy(*args, **kwargs):
        state["measured"] += 1
        state["measured_inside"] += state["inside"]
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(bench_cli, "keep_freed_memory", keep)
    monkeypatch.setattr(module, function_name, spy)
    out = tmp_path / "bench.json"
    common = ["--device", "cpu", "--repeats", "1", "--format", "json", "--output", str(out)]
    assert main(["bench", *argv, *common]) == 0
    assert (state["entered"], state["measured"], state["measured_inside"]) == (1, 2, 2)
    assert not state["inside"]
    assert json.loads(out.read_text())["metadata"]["freed_memory_kept"] is state["kept"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "nope"], "backends (['nope']) must be among"),
        (["--group-channels", "7"], "group_channels (7) must divide"),
        (["--device", "tpu"], "--device ('tpu') must be cpu or cuda"),
        (["--threads", "0"], "--threads (0) must be >= 1"),
        (["--device", "cpu", "--backends", "cpu", "--dtype", "float16"], "backends ('cpu') cannot"),
    ],
)
def test_cli_bench_op_bad_input(argv, message, capsys):
    code = main(["bench", "op", "--shapes", "1x16x6x6", "--repeats", "1", "--copy-mib", "0", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_bench_op_bad_shape_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "op", "--shapes", "8x64x56"])
    assert exit_info.value.code == 2
    assert "BxCxHxW" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_and_peak_memory():
    timing = measure_time(lambda: torch.randn(1024, 1024, device="cuda").sum(), "cuda", 1, 3)
    assert 0 < timing.minimum <= timing.median
    assert peak_memory(lambda: torch.empty(MIB, device="cuda"), "cuda") == 4 * MIB
    rows = benchmark_op(OpShape(2, 32, 12, 10), 5, device="cuda", repeats=2, copy_bytes=MIB)
    assert all(_positive(r["median_ms"]) and _positive(r["peak_mib"]) for r in rows)
    assert all(_positive(r["floor_ms"]) for r in rows)


# Models side by side.


@pytest.fixture
def tiny(monkeypatch) -> str:
    from tiny_model import register_tiny_model

    return register_tiny_model(monkeypatch)


def test_benchmark_model_row(tiny):
    from involution.benchmark.model import benchmark_model
    from involution.models import count_macs, create_model

    model = create_model(tiny, num_classes=7)
    macs = count_macs(model.eval(), (1, 3, 24, 24))
    params = sum(p.numel() for p in model.parameters())
    row = benchmark_model(model, batch_size=3, image_size=24, warmup=1, repeats=2)
    assert row["params_m"] == params / 1e6
    assert row["gmacs"] == macs / 1e9
    keys = ("inference_img_s", "inference_peak_mib", "training_img_s", "training_peak_mib")
    assert all(_positive(row[k]) for k in keys), row
    # Training keeps activations for the backward pass: it needs more memory than inference.
    assert row["training_peak_mib"] > row["inference_peak_mib"]
    with pytest.raises(ValueError, match="modes"):
        benchmark_model(model, modes=["serving"])
    with pytest.raises(ValueError, match="batch_size"):
        benchmark_model(model, batch_size=0)


def test_cli_bench_model_csv_and_chart(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, chart = tmp_path / "models.csv", tmp_path / "models.png"
    argv = ["bench", "model", "--models", tiny, "rednet26_cifar", "--model-arg", "base_width=16"]
    argv += ["--batch-size", "2", "--image-size", "32", "--modes", "inference", "--repeats", "1"]
    assert main([*argv, "--format", "csv", "--output", str(out), "--plot", str(chart)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["model"] for r in rows] == [tiny, "rednet26_cifar"]
    assert list(rows[0]) == ["model", "params_m", "gmacs", "inference_img_s", "inference_peak_mib"]
    assert all(float(r["inference_img_s"]) > 0 for r in rows)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_model_unknown_name(capsys):
    assert main(["bench", "model", "--models", "rednet27", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "'rednet27') is not a registered model" in err and "`involution list-models`" in err


def test_cli_bench_model_checks_every_name_before_measuring(tiny, monkeypatch, capsys):
    from involution.benchmark import model as model_bench

    measured = []
    monkeypatch.setattr(model_bench, "benchmark_model", lambda *a, **k: measured.append(a))
    assert main(["bench", "model", "--models", tiny, "rednet27", "--repeats", "1"]) == 2
    assert "'rednet27') is not a registered model" in capsys.readouterr().err
    argv = ["bench", "model", "--models", tiny, "rednet26", "--model-arg", "widht=16"]
    assert main(argv) == 2
    assert "'widht' is not an argument of" in capsys.readouterr().err
    assert measured == []
