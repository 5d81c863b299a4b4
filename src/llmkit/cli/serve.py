"""`llmkit serve`: an OpenAI-compatible HTTP server for any model llmkit loads (registered by cli/main.py)."""

from __future__ import annotations

import argparse
import os
import sys

from llmkit.cli.common import MODEL_HELP, add_device_args, int_at_least


def cmd_serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from llmkit.infer.load import load_model
    from llmkit.serve.app import create_app
    from llmkit.serve.served import serve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    served = serve_model(loaded, args.served_model_name or args.model, max_batch=args.max_batch,
                         max_context=args.max_context, max_queue=args.max_queue, api_key=args.api_key or None,
                         max_body_bytes=args.max_body_bytes)
    app = create_app(served)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # the socket is bound and the engine runs: only now is the URL worth printing
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
                host = f"[{args.host}]" if ":" in args.host else args.host
                what = "chat page, OpenAI API under /v1" if served.engine is not None else "embeddings under /v1"
                print(f"serving {served.model_id} at http://{host}:{port}/ ({what}); Ctrl-C stops", flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level in ("info", "debug"), timeout_graceful_shutdown=5)
    Server(config).run()
    sys.stdout.flush()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page (continuous batching)",
                       description="Serve one model over HTTP: /v1/chat/completions, /v1/completions, "
                                   "/v1/embeddings, /v1/models, /health, /metrics, and a chat page at /. Requests "
                                   "name the model by the id /v1/models lists (--served-model-name, else --model).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the server to the "
                   "network: set --api-key then)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="TCP port (0 = any free port; the URL printed "
                   "at start-up names it)")
    p.add_argument("--api-key", default=os.environ.get("LLMKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LLMKIT_API_KEY; none = open)")
    p.add_argument("--served-model-name", help="the model id clients send in 'model' (default: --model as given)")
    p.add_argument("--max-batch", type=int_at_least(1), default=8,
                   help="requests decoded together in one batch; more wait in the queue")
    p.add_argument("--max-context", type=int_at_least(2), default=None,
                   help="tokens per request, prompt + completion (default and upper bound: the model's context)")
    p.add_argument("--max-queue", type=int_at_least(1), default=64,
                   help="requests that may wait for a batch slot; beyond that clients get 429")
    p.add_argument("--max-body-bytes", type=int_at_least(1024), default=1_000_000,
                   help="largest request body accepted; larger ones get 413")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads for the model (default: PyTorch's choice, usually one per core)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level; info and debug also log every request")
    add_device_args(p)
    p.set_defaults(fn=cmd_serve)
