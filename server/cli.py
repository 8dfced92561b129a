"""``pictor serve``: the gRPC server over an index (and optionally a fine-tuned head)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pictor.config import (
    MAX_BATCH_SIZE,
    MAX_QUEUE_DELAY_MS,
    MAX_SERVER_WORKERS,
    ServerSettings,
    add_flag,
    build_settings,
    number,
    whole_number,
)
from pictor.errors import require_server_extra

HELP = """\
Serve an index over gRPC: Classify, Search, Embed, Upsert, Delete, Get, List, Info, plus the standard
grpc.health.v1 health service and server reflection.

Classify answers with the classes of a head trained by `pictor train` when --model is given,
else with the backbone's own ImageNet-1k labels, else (a backbone without them: a checkpoint
without its classifier, random weights) with a kNN vote over the index's labels. The index and
the head share the backbone, so one forward pass serves both. Stop with Ctrl-C or SIGTERM: calls in flight get up to 10 s to finish, then exit 0.

SIGHUP (`kill -HUP PID`, `docker compose kill -s HUP server`) reads the --model file again and
serves it from the next call on, without a restart: a head trained again on the same backbone
(`pictor train --mode linear`, more classes or images). Calls in flight finish with the model
they began with. A file that cannot be served (damaged, or a head for another backbone or one
that fine-tuned its own: rebuild the index with it and restart) is logged and the old model kept.

With PICTOR_TOKEN set (or `token` in the --config file; no flag, so it stays out of `ps`), every
call but health's must carry it, "authorization: Bearer TOKEN" (the client commands send their
$PICTOR_TOKEN), else it is answered UNAUTHENTICATED. Without TLS (below) it travels in clear: it
keeps out callers on a network you trust, not eavesdroppers.

With --tls-cert and --tls-key (PEM files: the certificate chain and its unencrypted private key;
or PICTOR_TLS_CERT and PICTOR_TLS_KEY), it takes only TLS connections; with --tls-client-ca
(PICTOR_TLS_CLIENT_CA) as well, only those of clients that show a certificate this CA signed
(mutual TLS). Health checks too: `pictor health` and the other client commands call over TLS
with PICTOR_TLS_CA set to the CA's certificate (or PICTOR_TLS=1 for a certificate the system's
CAs signed), and show PICTOR_TLS_CLIENT_CERT and PICTOR_TLS_CLIENT_KEY. The files are read again
when they change: a renewed certificate is served from the next connection on, without a
restart (a change that cannot be served is logged, the old one kept).

example:
  pictor index sample/gallery --out index
  pictor serve --index index --port 50051
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve", help="serve an index over gRPC", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", help="index directory written by `pictor index` (default: ./index)")
    p.add_argument("--model", help="model file from `pictor train`: Classify uses its head and classes (read again on SIGHUP)")
    add_flag(p, "weights", help="the checkpoint file of an index built with `pictor index --weights PATH` "
             "(its contents must be the same); with --model, the checkpoint the model was trained from, "
             "if it has moved")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=whole_number, help="port to bind (default 50051; 0 picks a free one)")
    p.add_argument("--workers", type=whole_number,
                   help=f"handler threads (default 8, 2 to {MAX_SERVER_WORKERS}); at most half of them take Upsert or "
                        "reflection streams, and with calls that wait for the model or a write (Classify, Embed, Search by "
                        "image, Delete) "
                        "they leave one free for health checks and lookups: one more is refused as busy "
                        "(so with 2, none runs while a stream is open)")
    p.add_argument("--upsert-idle-timeout", type=number, metavar="SECONDS",
                   help="end an Upsert or reflection stream that sends nothing for this long "
                        "(default 60), so a quiet client cannot hold a stream slot for good")
    p.add_argument("--metrics-port", type=whole_number, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (calls by method and status code, "
                        "their latency, the index's size, images through the model and the seconds they spend decoding, "
                        "waiting for the model and in it, images per pass, SIGHUP model reloads, the process's memory and CPU; "
                        "default 0: none)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve over TLS with this certificate (chain), server's first "
                   "(with --tls-key; default: plain TCP)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert, unencrypted")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="take only clients that show a certificate signed by a CA of this file (mutual TLS)")
    add_flag(p, "batch_size", help=f"most images in one forward pass (default {ServerSettings.batch_size}, at most "
             f"{MAX_BATCH_SIZE}): the calls that come while the model runs share its next pass (passes of 8 "
             "ran fastest on a 2-core CPU; a GPU may take more)")
    p.add_argument("--max-queue-delay-ms", type=number, metavar="MS",
                   help="how long a pass that is not full waits for more calls, from its oldest call's coming "
                        f"(default 0: none; at most {MAX_QUEUE_DELAY_MS}): for a GPU, whose larger passes cost "
                        "little more than small ones. A lone call waits all of it; on 2 CPU cores 5-20 ms "
                        "gained nothing beyond the runs' noise (docs/benchmarks.md)")
    add_flag(p, "max_pixels")
    p.add_argument("--max-message-mb", type=whole_number, metavar="MB",
                   help="largest request or reply (default 64, at most 2047); clients must allow it "
                        "too: PICTOR_MAX_MESSAGE_MB for the client commands")
    add_flag(p, "device")
    add_flag(p, "precision")
    add_flag(p, "compile", help="torch.compile the backbone: the first request compiles it (seconds, up to "
             "a minute with a cold cache), the first with another number of images once more; later "
             "ones run about 1.3x faster on a CPU (docs/benchmarks.md)")
    add_flag(p, "config")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_server_extra("pictor serve")
    from pictor.server.app import ServerStartError, serve

    settings = build_settings(ServerSettings, vars(args), config_file=args.config)
    try:
        serve(settings)
    except ServerStartError as e:  # the interpreter's exit would wait on the server for good
        print(f"pictor serve: error: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(2)
    return 0
