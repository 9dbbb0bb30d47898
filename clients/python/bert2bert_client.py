#!/usr/bin/env python3
"""A small Python client of the bert2bert coordinator's JobService (gRPC).

It compiles the stubs from the repository's proto/ with grpcio-tools when it starts (into a
temporary directory, or --stubs-dir to keep them), so no generated code is committed.

    pip install grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2
    export BERT2BERT_COORDINATOR=127.0.0.1:7070 BERT2BERT_TOKEN=...
    python clients/python/bert2bert_client.py submit job.yaml --watch   # progress on stderr
    python clients/python/bert2bert_client.py get job-1                 # JSON on stdout
    python clients/python/bert2bert_client.py watch job-1
    python clients/python/bert2bert_client.py list
    python clients/python/bert2bert_client.py cancel job-1

`get`, `list`, `cancel` and the end of `submit --watch` / `watch` print JSON on stdout with the
keys of `bert2bert status --json`. Exit codes as the bert2bert CLI: 0 ok, 1 failure (or, for
`watch` and `submit --watch`, a job that did not succeed), 2 bad usage or a request the
coordinator refused as the caller's fault (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...).
"""

import argparse
import importlib
import json
import os
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTOS = ["bert2bert/v1/jobs.proto", "bert2bert/v1/workers.proto"]
CALLER_FAULTS = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "UNAUTHENTICATED", "PERMISSION_DENIED"}
# Unary calls fail after this long rather than hang on a coordinator that does not answer; Watch
# has no deadline (it lasts as long as the job).
UNARY_TIMEOUT_S = 30
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


class UsageError(Exception):
    pass


def generate_stubs(out_dir, proto_dir=REPO / "proto"):
    """Compiles the protos into out_dir (as the bert2bert.v1 package) and imports them."""
    from grpc_tools import protoc

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + [str(proto_dir / p) for p in PROTOS]) != 0:
        raise RuntimeError(f"protoc failed on {proto_dir}")
    sys.path.insert(0, str(out_dir))
    jobs_pb2 = importlib.import_module("bert2bert.v1.jobs_pb2")
    jobs_pb2_grpc = importlib.import_module("bert2bert.v1.jobs_pb2_grpc")
    return jobs_pb2, jobs_pb2_grpc


class Client:
    """JobService calls with the bearer token on every request."""

    def __init__(self, target, token, stubs, tls_ca=None, tls_cert=None, tls_key=None):
        import grpc

        self.pb, grpc_mod = stubs
        if target.startswith("https://"):
            pem = {name: read_pem(name, path) for name, path in [("ca", tls_ca), ("cert", tls_cert), ("key", tls_key)]}
            creds = grpc.ssl_channel_credentials(pem["ca"], private_key=pem["key"], certificate_chain=pem["cert"])
            channel = grpc.secure_channel(target[len("https://"):], creds)
        else:
            channel = grpc.insecure_channel(target.removeprefix("http://"))
        self.stub = grpc_mod.JobServiceStub(channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def submit(self, job_yaml):
        return self.stub.Submit(self.pb.SubmitJobRequest(job_yaml=job_yaml), metadata=self.metadata, timeout=UNARY_TIMEOUT_S).job

    def get(self, job_id):
        return self.stub.Get(self.pb.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=UNARY_TIMEOUT_S).job

    def list(self):
        """Every job, newest first: List answers a page (at most 100 jobs) at a time."""
        jobs, token = [], ""
        while True:
            req = self.pb.ListJobsRequest(page_token=token)
            page = self.stub.List(req, metadata=self.metadata, timeout=UNARY_TIMEOUT_S)
            jobs.extend(page.jobs)
            if not page.next_page_token or page.next_page_token == token:
                return jobs
            token = page.next_page_token

    def delete(self, job_id):
        """Forgets an ended job (FAILED_PRECONDITION while it is PENDING or RUNNING)."""
        self.stub.DeleteJob(self.pb.DeleteJobRequest(job_id=job_id), metadata=self.metadata, timeout=UNARY_TIMEOUT_S)

    def cancel(self, job_id, reason=""):
        req = self.pb.CancelJobRequest(job_id=job_id, reason=reason)
        return self.stub.Cancel(req, metadata=self.metadata, timeout=UNARY_TIMEOUT_S).job

    def watch(self, job_id):
        """Yields WatchJobResponse messages until the job ends (the server closes the stream)."""
        yield from self.stub.Watch(self.pb.WatchJobRequest(job_id=job_id), metadata=self.metadata)


def state_name(pb, job):
    return pb.JobState.Name(job.state)


def job_json(pb, job):
    """The keys and values of `bert2bert status --json`."""
    return {
        "id": job.id,
        "name": job.name,
        "state": state_name(pb, job).removeprefix("JOB_STATE_"),
        "step": job.step,
        "total_steps": job.total_steps,
        "restarts": job.restarts,
        "reason": job.reason,
        "checkpoint_step": job.checkpoint_step,
        "workers": job.workers,
        "min_workers": job.min_workers,
        "created_unix_ms": job.created_unix_ms,
        "updated_unix_ms": job.updated_unix_ms,
        "goodput": goodput_json(job.goodput) if job.HasField("goodput") else None,
    }


def goodput_json(g):
    """The job's goodput as `status --json` shows it."""
    return {
        "ratio": g.ratio,
        "productive_s": g.productive_s,
        "wall_s": g.wall_s,
        "failures": g.failures,
        "steps_lost": g.steps_lost,
        "recovering_s": g.recovering_s,
    }


def follow(client, job_id, out=sys.stderr):
    """Prints every Watch event as a line on `out`; returns the job in its terminal state."""
    pb = client.pb
    for msg in client.watch(job_id):
        kind = msg.WhichOneof("event")
        if kind == "job":
            j = msg.job
            why = f": {j.reason}" if j.reason else ""
            print(f"{j.id} {state_name(pb, j).removeprefix('JOB_STATE_')} step {j.step}/{j.total_steps}{why}", file=out)
            if state_name(pb, j) in TERMINAL:
                return j
        elif kind == "progress":
            p = msg.progress
            print(
                f"step {p.step}/{p.total_steps} loss {p.loss:.4f} lr {p.lr:.3e} "
                f"{p.tokens_per_s:.0f} tok/s eta {p.eta_s:.0f}s",
                file=out,
            )
        elif kind == "eval":
            e = msg.eval
            extra = "".join(f" {n} {getattr(e, f):.2f}" for n, f in [("bleu", "bleu"), ("rougeL", "rouge_l")] if e.HasField(f))
            print(f"eval step {e.step} loss {e.loss:.4f}{extra}", file=out)
        elif kind == "worker":
            w = msg.worker
            kind_name = pb.WorkerEventKind.Name(w.kind).removeprefix("WORKER_EVENT_KIND_")
            print(f"worker {w.worker_id} rank {w.rank} {kind_name} {w.message}".rstrip(), file=out)
        out.flush()
    # The stream ended before a terminal state (e.g. the coordinator shut down): report as it is.
    return client.get(job_id)


def read_pem(name, path):
    if not path:
        return None
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read --tls-{name} {path}: {e.strerror}") from e


def read_token(token_file):
    if token_file:
        try:
            lines = pathlib.Path(token_file).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read token file {token_file}: {e.strerror}") from e
        token = lines[0].strip() if lines else ""
        if not token:
            raise UsageError(f"token file {token_file} is empty")
        return token
    return os.environ.get("BERT2BERT_TOKEN", "").strip() or None


def run(args, stubs):
    client = Client(args.coordinator, read_token(args.token_file), stubs, args.tls_ca, args.tls_cert, args.tls_key)
    pb = client.pb
    if args.command == "submit":
        try:
            job_yaml = pathlib.Path(args.job).read_text()
        except OSError as e:
            raise UsageError(f"cannot read job file {args.job}: {e.strerror}") from e
        job = client.submit(job_yaml)
        print(job.id, flush=True)
        if not args.watch:
            return 0
        args.job_id = job.id
    if args.command in ("submit", "watch"):
        last = follow(client, args.job_id)
        # The final status as `bert2bert status --json` reports it.
        final = client.get(last.id)
        print(json.dumps(job_json(pb, final)))
        return 0 if state_name(pb, final) == "JOB_STATE_SUCCEEDED" else 1
    if args.command == "get":
        print(json.dumps(job_json(pb, client.get(args.job_id))))
    elif args.command == "list":
        print(json.dumps({"jobs": [job_json(pb, j) for j in client.list()]}))
    elif args.command == "cancel":
        print(json.dumps(job_json(pb, client.cancel(args.job_id, args.reason))))
    elif args.command == "delete":
        client.delete(args.job_id)
        print(json.dumps({"deleted": args.job_id}))
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description="bert2bert JobService client (gRPC)")
    p.add_argument("--coordinator", default=os.environ.get("BERT2BERT_COORDINATOR"),
                   help="HOST:PORT, http://HOST:PORT or https://HOST:PORT (default $BERT2BERT_COORDINATOR)")
    p.add_argument("--token-file", help="file holding the client bearer token (default $BERT2BERT_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("BERT2BERT_TLS_CA"),
                   help="CA certificate (PEM) of an https:// coordinator (default $BERT2BERT_TLS_CA, else the system's)")
    p.add_argument("--tls-cert", default=os.environ.get("BERT2BERT_TLS_CERT"),
                   help="client certificate (PEM) for mutual TLS (default $BERT2BERT_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("BERT2BERT_TLS_KEY"),
                   help="its private key (PEM) (default $BERT2BERT_TLS_KEY)")
    p.add_argument("--proto-dir", default=str(REPO / "proto"), help="where bert2bert/v1/*.proto are")
    p.add_argument("--stubs-dir", help="write the generated stubs here (default: a temporary directory)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit a job file (send absolute paths: the coordinator resolves relative ones)")
    s.add_argument("job")
    s.add_argument("--watch", action="store_true", help="print events until the job ends, then its status as JSON")
    for name in ("watch", "get", "delete"):
        sub.add_parser(name).add_argument("job_id")
    c = sub.add_parser("cancel")
    c.add_argument("job_id")
    c.add_argument("--reason", default="")
    sub.add_parser("list")
    args = p.parse_args(argv)
    if not args.coordinator:
        p.error("--coordinator or BERT2BERT_COORDINATOR is required")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    import grpc

    with tempfile.TemporaryDirectory(prefix="b2b-stubs-") as tmp:
        out = pathlib.Path(args.stubs_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        try:
            stubs = generate_stubs(out, pathlib.Path(args.proto_dir))
            return run(args, stubs)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except grpc.RpcError as e:
            code = e.code().name
            print(f"error: {code}: {e.details()}", file=sys.stderr)
            return 2 if code in CALLER_FAULTS else 1


if __name__ == "__main__":
    sys.exit(main())
