"""Forward+backward time and peak extra memory of the ICD losses (internal + external, one
call) for each implementation of `loss.icd.impl`, on the taps of DeepLabV3-R101 at batch 12,
crop 512: layer1 256x128x128, layer2 512x64x64, layer3 1024x32x32, layer4 2048x32x32,
head 256x32x32 (student and teacher).

On a GPU it also times a device-to-device copy of the same bytes in the same run and reports
each implementation's achieved bandwidth against it: the fused floor moves
(2 reads forward + 1 read and 1 write backward) x the bytes of the taps (ICD_METHOD.md).
Triton needs CUDA (its CPU interpreter is a correctness tool, not a speed path).

    python tools/bench_loss.py [--batch 12] [--crop 512] [--dtype fp32|bf16|fp16]
                               [--repeats 5] [--out bench_loss.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import cpu_name  # noqa: E402

from icd_dist.losses.icd import MSCA  # noqa: E402
from icd_dist.losses.kernels.dispatch import icd_terms, triton_available  # noqa: E402

# (channels, stride) of the R101 taps at output stride 16... layer1 /4, layer2 /8, the rest /16.
TAPS = ((256, 4), (512, 8), (1024, 16), (2048, 16), (256, 16))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_taps(batch: int, crop: int, dtype: torch.dtype, device: torch.device):
    """Post-ReLU student taps (requiring grad) and teacher taps = student + noise."""
    g = torch.Generator(device=device).manual_seed(0)
    student, teacher = [], []
    for channels, stride in TAPS:
        shape = (batch, channels, crop // stride, crop // stride)
        s = torch.randn(shape, generator=g, device=device, dtype=dtype).relu_()
        t = (s + 0.3 * torch.randn(shape, generator=g, device=device, dtype=dtype)).relu_()
        student.append(s.requires_grad_())
        teacher.append(t)
    return student, teacher


class PeakMemory:
    """Peak memory above the level at entry: CUDA's allocator statistics on a GPU, resident
    set size sampled every millisecond by a thread on a CPU (with large blocks returned to the
    OS when freed: see main)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(impl, student, teacher, msca):
    for f in student:
        f.grad = None
    l_int, l_ext = icd_terms(student, teacher, tau=1.0, msca=msca, impl=impl)
    (l_int + 10.0 * l_ext).backward()
    return l_int.item(), l_ext.item()


def time_impl(impl, student, teacher, msca, repeats, device):
    """Median seconds of forward+backward after a warm-up call (which includes compilation),
    the warm-up time, the peak extra memory of one call, and the loss values."""
    t0 = time.perf_counter()
    values = run_once(impl, student, teacher, msca)
    sync(device)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run_once(impl, student, teacher, msca)
        sync(device)
        times.append(time.perf_counter() - t0)
    for f in student:
        f.grad = None
    with PeakMemory(device) as mem:
        run_once(impl, student, teacher, msca)
    return sorted(times)[len(times) // 2], warmup, mem.peak, values


def copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes per second of a device-to-device copy of nbytes (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(max(repeats, 5)):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / sorted(times)[len(times) // 2]


def main() -> None:
    if sys.platform == "linux" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed large blocks in the heap once its dynamic mmap threshold has grown,
        # so the resident set would not show a later call's peak: a fixed threshold returns
        # every large tensor to the OS when freed. Re-executes this script once with it.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="eager,compiled,triton")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default="bench_loss.json")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    device_name = f"GPU: {torch.cuda.get_device_name()}" if cuda else \
        f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"
    student, teacher = make_taps(args.batch, args.crop, dtype, device)
    tap_bytes = sum(f.numel() * f.element_size() for f in student)
    floor_bytes = 4 * tap_bytes
    copy_bw = copy_bandwidth(tap_bytes, device, args.repeats) if cuda else None
    msca = MSCA()
    print(f"{device_name}; taps of DeepLabV3-R101, batch {args.batch}, crop {args.crop}, "
          f"{str(dtype).removeprefix('torch.')}: {tap_bytes / 2**20:.0f} MiB per model",
          flush=True)

    rows = []
    for impl in args.impls.split(","):
        if impl == "triton" and not (cuda and triton_available()):
            rows.append({"impl": impl, "skipped": "needs CUDA and Triton"})
            continue
        print(f"timing {impl} ...", flush=True)
        seconds, warmup, peak, values = time_impl(impl, student, teacher, msca, args.repeats,
                                                  device)
        row = {"impl": impl, "seconds": seconds, "warmup_seconds": warmup,
               "peak_extra_bytes": peak, "loss_int": values[0], "loss_ext": values[1]}
        if copy_bw:
            row["bandwidth_fraction_of_copy"] = floor_bytes / seconds / copy_bw
        rows.append(row)
    eager = next((r for r in rows if r["impl"] == "eager" and "seconds" in r), None)
    for row in rows:
        if eager and "seconds" in row:
            row["speedup_vs_eager"] = eager["seconds"] / row["seconds"]
            row["memory_vs_eager"] = row["peak_extra_bytes"] / max(eager["peak_extra_bytes"], 1)

    header = (f"{'impl':<10}{'fwd+bwd ms':>12}{'vs eager':>10}{'peak extra MiB':>16}"
              f"{'mem vs eager':>14}{'of copy BW':>12}{'first call s':>14}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{r['impl']:<10}  skipped: {r['skipped']}")
            continue
        bw = f"{r['bandwidth_fraction_of_copy']:.0%}" if "bandwidth_fraction_of_copy" in r \
            else "n/a"
        print(f"{r['impl']:<10}{r['seconds'] * 1e3:>12.1f}{r.get('speedup_vs_eager', 1):>9.2f}x"
              f"{r['peak_extra_bytes'] / 2**20:>16.0f}{r.get('memory_vs_eager', 1):>13.2f}x"
              f"{bw:>12}{r['warmup_seconds']:>14.1f}")
    if copy_bw:
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s; fused floor moves "
              f"{floor_bytes / 2**20:.0f} MiB")
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if triton_available():
        import triton
        versions["triton"] = triton.__version__
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    Path(args.out).write_text(json.dumps({
        "device": device_name, "versions": versions, "dtype": str(dtype),
        "batch": args.batch, "crop": args.crop, "tap_bytes": tap_bytes,
        "copy_bandwidth_bytes_per_s": copy_bw, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
