#!/usr/bin/env python3
"""The hostile client of scripts/chaos.sh: raw gRPC calls that the bert2bert CLI would never send.

    chaos_client.py flood --coordinator HOST:PORT [--copies N]
        Submits 'name: ' + '['*100000 + ']'*100000 N times at once with the client token. Prints
        one line with each call's status code and seconds; exits 0 when every call was refused as
        the caller's fault (INVALID_ARGUMENT or RESOURCE_EXHAUSTED).

    chaos_client.py forge --coordinator HOST:PORT --job JOB_ID
        Holds only the shared worker token. Learns the job's real worker id from Watch (visible to
        any client), registers itself, then sends, for that worker and for itself, ReportDone at
        step 99999, CommitCheckpoint of /etc at step 99999, ReportFailed, and ReportProgress,
        without a secret and with its own. Prints one line of the codes; exits 0 when every
        forged call was refused.

Tokens come from BERT2BERT_TOKEN (client) and BERT2BERT_WORKER_TOKEN (worker). Stubs are compiled
from proto/ at start (clients/python/bert2bert_client.py).
"""

import argparse
import importlib
import os
import pathlib
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "clients" / "python"))
import bert2bert_client  # noqa: E402

REFUSED_INPUT = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
REFUSED_AUTH = {"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"}


def code_of(call):
    """Runs call(); returns 'OK' or the gRPC status code name."""
    import grpc

    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def flood(args, stubs_dir):
    import grpc

    jobs_pb2, jobs_grpc = bert2bert_client.generate_stubs(stubs_dir)
    text = "name: " + "[" * 100000 + "]" * 100000
    meta = [("authorization", f"Bearer {os.environ['BERT2BERT_TOKEN']}")]
    results = [None] * args.copies

    def one(i):
        stub = jobs_grpc.JobServiceStub(grpc.insecure_channel(args.coordinator))
        t0 = time.monotonic()
        code = code_of(lambda: stub.Submit(jobs_pb2.SubmitJobRequest(job_yaml=text), metadata=meta, timeout=120))
        results[i] = (code, time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("flood submits: " + ", ".join(f"{c} in {s:.2f} s" for c, s in results))
    return 0 if all(c in REFUSED_INPUT for c, _ in results) else 1


def victim_worker(jobs_pb2, jobs_grpc, channel, job_id):
    """The id of a worker of the job's gang, as any client sees it in Watch."""
    meta = [("authorization", f"Bearer {os.environ['BERT2BERT_TOKEN']}")]
    stream = jobs_grpc.JobServiceStub(channel).Watch(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=meta, timeout=30)
    for msg in stream:
        if msg.WhichOneof("event") == "worker" and msg.worker.worker_id:
            stream.cancel()
            return msg.worker.worker_id
    raise RuntimeError("no worker event in Watch")


def forge(args, stubs_dir):
    import grpc

    jobs_pb2, jobs_grpc = bert2bert_client.generate_stubs(stubs_dir)
    w_pb2 = importlib.import_module("bert2bert.v1.workers_pb2")
    w_grpc = importlib.import_module("bert2bert.v1.workers_pb2_grpc")
    channel = grpc.insecure_channel(args.coordinator)
    victim = victim_worker(jobs_pb2, jobs_grpc, channel, args.job)
    stub = w_grpc.WorkerServiceStub(channel)
    meta = [("authorization", f"Bearer {os.environ['BERT2BERT_WORKER_TOKEN']}")]
    reg = stub.Register(
        w_pb2.RegisterWorkerRequest(hostname="mallory", capabilities=w_pb2.Capabilities(device="cpu")),
        metadata=meta,
        timeout=30,
    )
    own_secret = getattr(reg, "worker_secret", "")
    codes = {}
    for who, secret in [(victim, ""), (victim, own_secret), (reg.worker_id, own_secret)]:
        for attempt in range(1, 4):
            common = dict(worker_id=who, job_id=args.job, attempt=attempt, worker_secret=secret)
            calls = {
                "ReportDone": lambda: stub.ReportDone(
                    w_pb2.ReportDoneRequest(step=99999, **common), metadata=meta, timeout=30
                ),
                "CommitCheckpoint(/etc)": lambda: stub.CommitCheckpoint(
                    w_pb2.CommitCheckpointRequest(step=99999, path="/etc", manifest_sha256="0" * 64, **common),
                    metadata=meta,
                    timeout=30,
                ),
                "ReportProgress": lambda: stub.ReportProgress(
                    w_pb2.ReportProgressRequest(progress=jobs_pb2.Progress(step=99999, total_steps=99999), **common),
                    metadata=meta,
                    timeout=30,
                ),
                "ReportFailed": lambda: stub.ReportFailed(
                    w_pb2.ReportFailedRequest(step=1, reason="forged", **common), metadata=meta, timeout=30
                ),
            }
            for name, call in calls.items():
                codes.setdefault(name, set()).add(code_of(call))
    print("forged calls (victim without secret, victim with another worker's secret, own id not in the gang): "
          + "; ".join(f"{name} -> {'/'.join(sorted(c))}" for name, c in codes.items()))
    accepted = [name for name, c in codes.items() if not c <= REFUSED_AUTH]
    if accepted:
        print("accepted: " + ", ".join(accepted))
    return 1 if accepted else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood")
    f.add_argument("--coordinator", required=True)
    f.add_argument("--copies", type=int, default=2)
    g = sub.add_parser("forge")
    g.add_argument("--coordinator", required=True)
    g.add_argument("--job", required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        return flood(args, d) if args.cmd == "flood" else forge(args, d)


if __name__ == "__main__":
    sys.exit(main())
