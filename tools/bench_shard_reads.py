"""Reading shards from object storage: our reader's per-sample range requests against
webdataset's one streamed GET per shard, on S3's API (moto's server on loopback, started and
stopped here), the same shards and samples, best of R repeats, the two interleaved.

- ranged (icd_dist.data.shard_files.ShardFile, what training uses): for every sample, in a
  seeded random order over the whole set (an epoch's order), its JPEG and its PNG by the
  manifest's offsets: 2 range requests a sample.
- ranged, shard order: the same requests in the order the samples lie in the shards.
- streamed (webdataset.WebDataset over presigned URLs, read by curl): 1 GET a shard, samples
  in shard order only (a shuffle is a buffer over the stream, not an epoch's permutation).

Only the bytes are read (no decoding: it costs the same in both). On loopback a request costs
microseconds of network; on a real object store each costs a round trip (typically tens of
milliseconds to the first byte), which the request counts in the table let you add.

    python tools/bench_shard_reads.py [--samples 256] [--size 128 160] [--repeats 3] [--out FILE]

Prints a table and writes JSON (default tools/results/bench_shard_reads_cpu.json) with the
device and versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import cpu_name  # noqa: E402

from icd_dist.data.manifest import load_manifest  # noqa: E402
from icd_dist.data.shard_files import ShardFile  # noqa: E402
from icd_dist.data.synthetic import build_synthetic  # noqa: E402
from icd_dist.train.ray_session import free_local_port  # noqa: E402

BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto(port: int) -> tuple[subprocess.Popen, object]:
    """moto's S3 server on loopback with the bucket; (process, boto3 client)."""
    import boto3

    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    for _ in range(150):  # it takes a moment to listen
        try:
            client.create_bucket(Bucket=BUCKET)
            return server, client
        except Exception:  # noqa: BLE001 - connection refused until it is up
            if server.poll() is not None:
                raise SystemExit("moto_server exited") from None
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto_server did not answer")


def read_ranged(uri: str, records, order: list[int]) -> tuple[float, int, int]:
    """(seconds, requests, bytes) to read every sample's two members by range requests."""
    files: dict[str, ShardFile] = {}
    requests = nbytes = 0
    start = time.perf_counter()
    for i in order:
        rec = records[i]
        f = files.get(rec.shard) or files.setdefault(rec.shard, ShardFile(f"{uri}/{rec.shard}"))
        for offset, size in (rec.image, rec.label):
            data = f.read_at(size, offset)
            assert len(data) == size, rec.key
            requests += 1
            nbytes += size
    seconds = time.perf_counter() - start
    for f in files.values():
        f.close()
    return seconds, requests, nbytes


def read_streamed(urls: list[str], expected: int) -> tuple[float, int, int]:
    """(seconds, requests, bytes) to read every sample of the shards with webdataset."""
    import webdataset as wds

    start = time.perf_counter()
    samples = nbytes = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=True):
        nbytes += len(sample["jpg"]) + len(sample["png"])
        samples += 1
    seconds = time.perf_counter() - start
    assert samples == expected, (samples, expected)
    return seconds, len(urls), nbytes


def main(argv: list[str] | None = None) -> int:
    """Build, upload, read both ways; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--size", type=int, nargs=2, default=[128, 160], metavar=("H", "W"))
    p.add_argument("--shard-size", default="2MB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path,
                   default=ROOT / "tools" / "results" / "bench_shard_reads_cpu.json")
    args = p.parse_args(argv)
    import webdataset as wds

    port = free_local_port()
    server, client = start_moto(port)
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "shards"
            build_synthetic(folder, args.samples, 5, tuple(args.size), seed=0,
                            shard_size=args.shard_size, progress=False)
            for path in sorted(folder.iterdir()):
                client.upload_file(str(path), BUCKET, f"shards/{path.name}")
            records = load_manifest(folder).samples
            shards = sorted({r.shard for r in records})
            urls = [f"pipe:curl -s -f {client.generate_presigned_url('get_object', Params={'Bucket': BUCKET, 'Key': f'shards/{s}'}, ExpiresIn=3600)!r}"  # noqa: E501
                    for s in shards]
        uri = f"s3://{BUCKET}/shards"
        shuffled = [int(i) for i in np.random.default_rng(0).permutation(len(records))]
        modes = {"ranged, epoch order": lambda: read_ranged(uri, records, shuffled),
                 "ranged, shard order": lambda: read_ranged(uri, records,
                                                            list(range(len(records)))),
                 "streamed (webdataset)": lambda: read_streamed(urls, len(records))}
        best: dict[str, tuple[float, int, int]] = {}
        for _ in range(args.repeats):
            for name, run in modes.items():
                got = run()
                if name not in best or got[0] < best[name][0]:
                    best[name] = got
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    device = f"{cpu_name()}, {os.cpu_count()} CPUs (S3 API: moto {moto_version()} on loopback)"
    rows = [{"mode": name, "seconds": s, "requests": r, "megabytes": b / 1e6,
             "samples_per_s": len(records) / s} for name, (s, r, b) in best.items()]
    print(f"{device}; {len(records)} samples of {args.size[0]}x{args.size[1]} in "
          f"{len(shards)} shards; best of {args.repeats}")
    print(f"{'mode':22} {'seconds':>8} {'requests':>9} {'MB':>7} {'samples/s':>10}")
    for r in rows:
        print(f"{r['mode']:22} {r['seconds']:8.3f} {r['requests']:9d} {r['megabytes']:7.2f} "
              f"{r['samples_per_s']:10.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "tool": "tools/bench_shard_reads.py", "argv": sys.argv[1:],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "samples": len(records), "shards": len(shards),
        "size": args.size, "repeats": args.repeats,
        "versions": {"python": platform.python_version(), "webdataset": wds.__version__,
                     "pyarrow": __import__("pyarrow").__version__, "moto": moto_version()},
        "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def moto_version() -> str:
    """The installed moto's version."""
    from importlib.metadata import version

    return version("moto")


if __name__ == "__main__":
    sys.exit(main())
