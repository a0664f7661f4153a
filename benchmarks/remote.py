"""safeckpt save/load against an S3 API server (moto, loopback) next to plain s3fs put_file/get_file
of the same bytes, in the same run.

    python benchmarks/remote.py [--mb 1024] [--repeats 2]

Plain s3fs moves one local file of the same size (its time excludes writing that file to local
disk beforehand). safeckpt's save includes streaming from tensor memory, SHA-256 and the
create-only manifest commit; its load includes listing, the manifest, every digest and building
the tensors. Methods alternate within each repeat; medians are printed as Markdown rows.
Objects are deleted after each repeat (moto keeps them in this process's memory).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import fsspec
import torch
from moto.server import ThreadedMotoServer

import safeckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = {"endpoint_url": url, "client_kwargs": {"region_name": "us-east-1"}}
    fs = fsspec.filesystem("s3", **opts)

    torch.manual_seed(0)
    per = 64 * 1024 * 1024 // 4  # 64 MiB float32 tensors
    state = {f"layer{i}.weight": torch.randn(per) for i in range(max(1, args.mb // 64))}
    nbytes = sum(t.nbytes for t in state.values())
    times: dict[str, list[float]] = {k: [] for k in ("s3fs put_file", "safeckpt save", "s3fs get_file", "safeckpt load")}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "blob.bin"
        with open(local, "wb") as f:
            for t in state.values():
                f.write(memoryview(t.numpy()).cast("B"))
        for repeat in range(args.repeats):
            key = f"{bucket}/plain/blob-{repeat}.bin"
            start = time.perf_counter()
            fs.put_file(str(local), key)
            times["s3fs put_file"].append(time.perf_counter() - start)

            root = f"s3://{bucket}/run{repeat}"
            start = time.perf_counter()
            path = safeckpt.save_checkpoint(state, None, None, None, 1, directory=root, rng=False, storage_options=opts)
            times["safeckpt save"].append(time.perf_counter() - start)

            start = time.perf_counter()
            fs.get_file(key, str(Path(tmp) / "back.bin"))
            times["s3fs get_file"].append(time.perf_counter() - start)
            os.unlink(Path(tmp) / "back.bin")

            start = time.perf_counter()
            ckpt = safeckpt.load_checkpoint(path, restore_rng=False, storage_options=opts)
            times["safeckpt load"].append(time.perf_counter() - start)
            assert all(torch.equal(ckpt.model_state[k], v) for k, v in state.items())
            del ckpt
            fs.rm(key)
            fs.rm(root, recursive=True)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr)
    server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"State {nbytes / 2**20:.0f} MiB, {args.repeats} repeats, medians [min-max] (s); load avg {os.getloadavg()[0]:.2f}")
    print("| Operation | plain s3fs (s) | safeckpt (s) | safeckpt / s3fs |")
    print("|---|---|---|---|")
    for op, plain, ours in (("save / put_file", "s3fs put_file", "safeckpt save"), ("load / get_file", "s3fs get_file", "safeckpt load")):
        print(
            f"| {op} | {med[plain]:.2f} [{min(times[plain]):.2f}-{max(times[plain]):.2f}] | "
            f"{med[ours]:.2f} [{min(times[ours]):.2f}-{max(times[ours]):.2f}] | {med[ours] / med[plain]:.2f}x |"
        )


if __name__ == "__main__":
    main()
