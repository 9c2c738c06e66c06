"""vram helpers: hand-computed sizes and bandwidth strings, the no-CUDA paths, and (only where CUDA exists) GPU paths."""

import mmap
import time

import pytest
import torch

from tracelens.model import vram
from tracelens.model.vram import (
    NO_CUDA_NOTE,
    Profile,
    bandwidth_report,
    find_cuda_tensors,
    gpu_profile,
    memory_stats,
    tensor_size_gb,
)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA paths can only run where CUDA exists")
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="tests the no-CUDA fallback")


# --- tensor_size_gb ----------------------------------------------------------------------------------------------


def test_tensor_size_gb_of_the_seed_example_is_decimal_gb():
    # 64 * 300 * 2304 = 44,236,800 elements * 2 bytes (bfloat16) = 88,473,600 bytes.
    assert tensor_size_gb((64, 300, 2304)) == pytest.approx(0.0884736, rel=1e-12)
    assert round(tensor_size_gb((64, 300, 2304)), 4) == 0.0885
    # The seed's "0.089" is this decimal-GB value; GiB (2**30) would give 0.082.
    assert abs(tensor_size_gb((64, 300, 2304)) - 0.089) < 1e-3
    assert abs(88_473_600 / 2**30 - 0.089) > 5e-3


@pytest.mark.parametrize(
    ("shape", "dtype", "n_bytes"),
    [
        ((1000, 1000), torch.float32, 4_000_000),
        ((1000, 1000), torch.float16, 2_000_000),
        ((10, 10, 10), torch.int8, 1000),
        ((3,), torch.float64, 24),
        ((), torch.float32, 4),  # a scalar is one element
        ((0, 5), torch.bfloat16, 0),
        (torch.Size([2, 3]), torch.int64, 48),
    ],
)
def test_tensor_size_gb_hand_computed(shape, dtype, n_bytes):
    assert tensor_size_gb(shape, dtype) == pytest.approx(n_bytes / 1e9, rel=1e-12, abs=0)


def test_tensor_size_gb_matches_a_real_tensor():
    t = torch.empty(7, 11, dtype=torch.float16)
    assert tensor_size_gb(t.shape, t.dtype) * 1e9 == t.numel() * t.element_size()


@pytest.mark.unchecked_types
@pytest.mark.parametrize("shape", [(2, -1), (2.5, 3), (True, 2), ("4",)])
def test_tensor_size_gb_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"shape must be a sequence of non-negative ints.*bad entries"):
        tensor_size_gb(shape)


@pytest.mark.unchecked_types
def test_tensor_size_gb_rejects_a_non_dtype():
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype"):
        tensor_size_gb((2, 2), "bfloat16")


# --- bandwidth_report --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_gb", "elapsed", "expected"),
    [
        (4.6, 0.19, "4.6GB in 0.19s = 24.2 GB/s"),  # the seed's example: 4.6 / 0.19 = 24.21
        (1, 2, "1GB in 2s = 0.5 GB/s"),
        (0, 1.5, "0GB in 1.5s = 0.0 GB/s"),
        (250, 0.5, "250GB in 0.5s = 500.0 GB/s"),
        (0.123456, 0.001, "0.123GB in 0.001s = 123.5 GB/s"),
    ],
)
def test_bandwidth_report_hand_computed(data_gb, elapsed, expected):
    assert bandwidth_report(data_gb=data_gb, elapsed=elapsed) == expected


@pytest.mark.parametrize("elapsed", [0, -1.0, float("nan")])
def test_bandwidth_report_rejects_non_positive_elapsed(elapsed):
    with pytest.raises(ValueError, match=r"elapsed must be a positive number of seconds"):
        bandwidth_report(1.0, elapsed)


def test_bandwidth_report_rejects_negative_data():
    with pytest.raises(ValueError, match=r"data_gb must be a non-negative number of GB; got -1"):
        bandwidth_report(-1, 1.0)


# --- gpu_profile ------------------------------------------------------------------------------------------------


def test_gpu_profile_times_a_sleep_of_known_length(capsys):
    with gpu_profile("nap") as prof:
        time.sleep(0.2)
    assert isinstance(prof, Profile)
    assert prof.name == "nap" and prof.cuda is HAS_CUDA
    assert 0.2 <= prof.elapsed < 0.2 + 0.3  # sleep never returns early; allow slack for a busy machine
    out = capsys.readouterr().out
    assert out.startswith(f"[nap] {prof.elapsed:.2f}s | ")
    assert out.count("\n") == 1


def test_gpu_profile_verbose_false_prints_nothing_but_still_measures(capsys):
    with gpu_profile("quiet", verbose=False) as prof:
        time.sleep(0.01)
    assert capsys.readouterr().out == ""
    assert prof.elapsed >= 0.01


def test_gpu_profile_fills_the_profile_and_prints_when_the_block_raises(capsys):
    with pytest.raises(RuntimeError, match="boom"):
        with gpu_profile("fails") as prof:
            raise RuntimeError("boom")
    assert prof.elapsed is not None and prof.elapsed >= 0
    assert capsys.readouterr().out.startswith("[fails] ")


@needs_no_cuda
def test_gpu_profile_without_cuda_reports_rss_and_says_so(capsys):
    with gpu_profile("cpu block") as prof:
        # Fresh anonymous pages, touched: RSS must grow by ~50 MB (a bytearray could reuse freed heap pages).
        block = mmap.mmap(-1, 50_000_000)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
    block.close()
    out = capsys.readouterr().out.strip()
    assert prof.cuda is False
    assert prof.start_gb > 0 and prof.end_gb > 0  # /proc exists on the Linux test machines
    assert prof.delta_gb == pytest.approx(prof.end_gb - prof.start_gb)
    assert prof.delta_gb > 0.03
    assert prof.peak_gb >= prof.end_gb - 1e-3
    assert out.endswith(NO_CUDA_NOTE) and "| rss " in out and "| delta +" in out
    assert out == prof.summary()


def test_profile_summary_formats_match_the_seed():
    cuda = Profile("forward pass", cuda=True, elapsed=0.4512, peak_gb=12.31, delta_gb=2.14)
    assert cuda.summary() == "[forward pass] 0.45s | peak 12.3GB | delta +2.1GB"
    assert Profile("x", cuda=True, elapsed=1, peak_gb=1, delta_gb=-0.5).summary() == "[x] 1.00s | peak 1.0GB | delta -0.5GB"
    cpu = Profile("x", cuda=False, elapsed=0.1, end_gb=1.234, delta_gb=0.0)
    assert cpu.summary() == "[x] 0.10s | rss 1.2GB | delta +0.0GB (no CUDA: CPU time and RSS)"
    unknown = Profile("x", cuda=False, elapsed=0.1)
    assert unknown.summary() == "[x] 0.10s | rss ?GB | delta ?GB (no CUDA: CPU time and RSS)"


# --- memory_stats / find_cuda_tensors without CUDA ---------------------------------------------------------------


@needs_no_cuda
def test_memory_stats_without_cuda_has_the_seeds_keys_from_the_process_and_system():
    stats = memory_stats()
    assert stats["cuda"] is False and stats["device"] == "cpu"
    assert set(stats) == {"cuda", "device", "allocated", "reserved", "free", "total"}
    assert stats["allocated"] == pytest.approx(vram._rss_gb(), rel=0.1)  # RSS moves a little between reads
    assert stats["reserved"] >= stats["allocated"] - 1e-3  # peak RSS
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    assert stats["total"] == pytest.approx(int(meminfo["MemTotal"].split()[0]) * 1024 / 1e9, rel=0.01)
    assert 0 < stats["free"] <= stats["total"]
    assert memory_stats("cpu")["device"] == "cpu"


def test_memory_stats_cpu_values_are_none_where_the_platform_hides_them(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc")

    monkeypatch.setattr("builtins.open", no_proc)
    stats = memory_stats("cpu")
    assert stats["allocated"] is None and stats["free"] is None and stats["total"] > 0


def test_rss_falls_back_to_none_without_proc(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr("builtins.open", no_proc)
    assert vram._rss_gb() is None


@needs_no_cuda
def test_find_cuda_tensors_is_empty_without_cuda():
    keep = torch.ones(3)  # a live CPU tensor is not a CUDA tensor
    assert find_cuda_tensors() == []
    del keep


def test_the_gc_scan_finds_live_tensors_of_a_device_type_largest_first():
    # "meta" tensors have a shape and dtype but no storage, so this exercises the scan without CUDA or memory.
    big = torch.empty(64, 300, 2304, dtype=torch.bfloat16, device="meta")
    small = torch.empty(10, dtype=torch.float32, device="meta")
    found = vram._find_tensors("meta")
    assert (torch.Size([64, 300, 2304]), torch.bfloat16, "meta", 88.47) in found
    assert (torch.Size([10]), torch.float32, "meta", 0.0) in found
    sizes = [rec[3] for rec in found]
    assert sizes == sorted(sizes, reverse=True)
    assert all(rec[2] == "meta" for rec in found)
    assert (torch.Size([10]), torch.float32, "meta", 0.0) not in vram._find_tensors("meta", min_mb=1.0)
    del big, small


# --- CUDA paths (skipped on machines without CUDA) ---------------------------------------------------------------


@needs_cuda
def test_memory_stats_with_cuda_has_the_seed_keys():
    stats = memory_stats()
    assert stats["cuda"] is True
    assert {"allocated", "reserved", "free", "total"} <= set(stats)
    assert 0 <= stats["allocated"] <= stats["reserved"] <= stats["total"]
    assert 0 <= stats["free"] <= stats["total"]


@needs_cuda
def test_gpu_profile_with_cuda_measures_peak_and_delta(capsys):
    torch.cuda.empty_cache()
    with gpu_profile("alloc") as prof:
        kept = torch.empty(250_000_000, dtype=torch.uint8, device="cuda")  # 0.25 GB kept
        tmp = torch.empty(500_000_000, dtype=torch.uint8, device="cuda")  # 0.5 GB freed inside
        del tmp
    assert prof.cuda is True
    assert prof.delta_gb == pytest.approx(0.25, abs=0.01)
    assert prof.peak_gb >= prof.start_gb + 0.75 - 0.01
    out = capsys.readouterr().out.strip()
    assert out == prof.summary() and "| peak " in out and NO_CUDA_NOTE not in out
    del kept


@needs_cuda
def test_find_cuda_tensors_finds_a_leaked_tensor():
    leaked = torch.empty(64, 300, 2304, dtype=torch.bfloat16, device="cuda")
    found = find_cuda_tensors()
    assert (torch.Size([64, 300, 2304]), torch.bfloat16, str(leaked.device), 88.47) in found
    del leaked


def test_module_doctest_runs():
    import doctest

    result = doctest.testmod(vram)
    assert result.failed == 0 and result.attempted >= 2
