"""fedllm run | resume | export | eval | compare | plot | list"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback

from fedllm import eval_cli
from fedllm.errors import USER_ERRORS, describe
from fedllm.registry import RecipeError


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the verb's parser must not reset a --debug given before the verb
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the Python traceback of an error")
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=None,
                         help="torch CPU threads per process (same as client.threads=N; default: chosen from the usable cores)")
    threads.add_argument("--processes", type=int, default=1, metavar="N",
                         help="N ranks on this machine, forked after the imports (like torchrun --nproc-per-node N, "
                         "without N+1 imports of torch)")
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated fine-tuning of LLMs.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser
    sub.add_parser = lambda *a, **kw: add(*a, parents=[common], **kw)  # --debug after the verb too
    run = add("run", help="run a recipe (dotted key=value overrides after it)", parents=[common, threads])
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", metavar="key.path=value")
    resume = add("resume", help="continue a run from its last checkpoint", parents=[common, threads])
    resume.add_argument("run_dir")
    resume.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="what may change after the start: more federation.rounds, eval.*, output.*")
    resume.add_argument("--trust-remote-code", action="store_true", help="allow the run's model.trust_remote_code: true")
    export = sub.add_parser("export", help="write a run's global adapter (peft) or merged model (merged)")
    export.add_argument("run_dir")
    export.add_argument("out")
    export.add_argument("--trust-remote-code", action="store_true", help="allow the run's model.trust_remote_code: true")
    export.add_argument("--round", default="last", help="round number or 'last'")
    export.add_argument("--to", default=None, choices=["peft", "merged"], dest="fmt", help="default: the adapter's own (peft where possible)")
    eval_cli.add_parsers(sub)  # eval, compare, plot
    sub.add_parser("list", help="every registered plugin and its options")
    add_deploy_verbs(sub)
    return parser


def add_deploy_verbs(sub) -> None:
    """serve | join | certs | split: a federation across organisations on Flower (fedllm[flower])."""
    serve = sub.add_parser("serve", help="run a recipe's server side on Flower: a SuperLink the parties join (TLS)")
    serve.add_argument("recipe", nargs="?")
    serve.add_argument("overrides", nargs="*", metavar="key.path=value")
    serve.add_argument("--certs", required=True, help="folder with ca.crt, server.pem, server.key (fedllm certs)")
    serve.add_argument("--party-key", action="append", default=[], metavar="KEY.pub=CLIENT_ID",
                       help="a party's public key and the one client id it may act as (repeat per party)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9092)
    serve.add_argument("--resume", metavar="RUN_DIR", help="continue a served run from its last checkpoint")
    serve.add_argument("--eval-data", metavar="PATH", help="a held-out file the server owns: also evaluated on the "
                       "server (server_eval_loss), besides the parties' federated eval")
    join = sub.add_parser("join", help="join a served federation as one party, with your own data")
    join.add_argument("recipe")
    join.add_argument("overrides", nargs="*", metavar="key.path=value")
    join.add_argument("--data", required=True, help="your training rows (json/jsonl/csv/parquet), in the recipe's format")
    join.add_argument("--client-id", type=int, required=True, help="the client id the server's operator gave you")
    join.add_argument("--superlink", required=True, metavar="HOST:PORT")
    join.add_argument("--ca", required=True, help="the CA certificate that signed the server's (ca.crt)")
    join.add_argument("--key", required=True, help="your private key (its .pub is registered with the server)")
    join.add_argument("--signer", metavar="signing.pub", help="the server's app-signing key: only runs it signed are "
                      "answered (default: signing.pub beside --ca)")
    join.add_argument("--state-dir", default="fedllm-party", help="where your state between rounds lives")
    join.add_argument("--eval-data", metavar="PATH", help="your held-out rows: the server's federated eval scores "
                      "the global adapter on them (without them this party is left out of evaluation)")
    certs = sub.add_parser("certs", help="a local CA, the server's TLS certificate and party key pairs")
    certs.add_argument("out")
    certs.add_argument("--host", action="append", default=[], help="the server's name or IP (repeatable)")
    certs.add_argument("--parties", type=int, default=2)
    split = sub.add_parser("split", help="write each simulated client's rows to client_<i>.jsonl (test federations)")
    split.add_argument("recipe")
    split.add_argument("out")
    split.add_argument("overrides", nargs="*", metavar="key.path=value")


def run_deploy_verb(args) -> None:
    try:
        import cryptography  # noqa: F401  (Flower's, for the certificates and node keys)
        from fedllm.deploy import launch
    except ImportError as err:
        raise RecipeError(f"`fedllm {args.command}` needs the Flower extra ({err}): pip install 'fedllm[flower]'") from None

    if args.command == "serve":
        if not args.recipe and not args.resume:
            raise RecipeError("give a recipe, or --resume RUN_DIR")
        from fedllm.summary import run_summary

        began = time.perf_counter()
        run_dir = launch.serve(args.recipe, args.overrides, args.certs, launch.parse_party_keys(args.party_key), args.host,
                               args.port, args.resume, args.eval_data)
        print(run_summary(run_dir, time.perf_counter() - began))
    elif args.command == "join":
        launch.join(args.recipe, args.overrides, args.data, args.client_id, args.superlink, args.ca, args.key, args.state_dir,
                    eval_data=args.eval_data, signer=args.signer)
    elif args.command == "certs":
        from fedllm.deploy.certs import make_certificates

        print(f"certificates in {make_certificates(args.out, args.host + ['127.0.0.1', 'localhost'], args.parties)}")
    elif args.command == "split":
        for path in launch.split_for_parties(args.recipe, args.overrides, args.out):
            print(path)


def list_plugins() -> str:
    from fedllm.models import PRESETS
    from fedllm.recipe import FEDERATION_MODES
    from fedllm.registry import ALL

    lines = [f"model presets: {', '.join(sorted(PRESETS))}", f"federation modes: {', '.join(FEDERATION_MODES)}"]
    # which local optimizer each strategy's method is derived for (client.optim)
    local = lambda s: f"local steps: {s.local_optimizer or 'any client.optim'}"  # noqa: E731
    for kind, registry in ALL.items():
        lines.append(f"{kind}:")
        lines.append(registry.describe(local if kind == "strategies" else None) or "  (none)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # overrides after an option (`run r.yaml --threads 1 a=b`) are left over by argparse
    if rest and (not hasattr(args, "overrides") or not all("=" in r and not r.startswith("-") for r in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides += rest
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "threads", None) is not None:
        args.overrides.append(f"client.threads={args.threads}")
    try:
        if getattr(args, "processes", 1) != 1:
            return launch_ranks(args)
        return execute(args)
    except USER_ERRORS as err:
        return report(err, args)
    except KeyboardInterrupt:  # Ctrl-C: how a user stops `join` (what it started is stopped on the way out)
        if getattr(args, "debug", False):
            raise
        print(f"fedllm {args.command}: stopped (Ctrl-C)", file=sys.stderr)
        return 130


def execute(args) -> int:
    """The verb, in this process; a user's mistake is reported in one line (exit status 2)."""
    try:
        if args.command == "list":
            print(list_plugins())
            return 0
        if args.command in eval_cli.COMMANDS:
            return eval_cli.main(args)
        if args.command in ("serve", "join", "certs", "split"):
            run_deploy_verb(args)
            return 0
        from fedllm import engine

        start = time.perf_counter()
        if args.command == "run":
            summarize(engine.run_recipe(args.recipe, args.overrides), start)
        elif args.command == "resume":
            summarize(engine.resume_run(args.run_dir, args.overrides, trust_remote_code=args.trust_remote_code), start)
        elif args.command == "export":
            from fedllm.export import export_run

            print(f"exported to {export_run(args.run_dir, args.out, args.round, args.fmt, args.trust_remote_code)}")
    except USER_ERRORS as err:
        return report(err, args)
    return 0


def launch_ranks(args) -> int:
    """`run` / `resume` on --processes ranks forked from this process once it has imported the
    engine (and checked the recipe, so that a mistake in it is reported once, not per rank)."""
    from fedllm import engine  # noqa: F401  (imported once, here, for every rank)
    from fedllm.capabilities import check_pairings
    from fedllm.launcher import fork_ranks
    from fedllm.recipe import load_recipe

    if args.command == "run":
        check_pairings(load_recipe(args.recipe, args.overrides), world_size=args.processes)
    processes, args.processes = args.processes, 1
    return fork_ranks(processes, lambda: execute(args))


def report(err: Exception, args) -> int:
    if vars(args).get("debug"):
        traceback.print_exc()
    print(f"fedllm: error: {describe(err)}", file=sys.stderr)
    return 2


def summarize(run_dir, start: float) -> None:
    from fedllm.distributed import process_state
    from fedllm.summary import run_summary

    if process_state().is_main_process:
        print(run_summary(run_dir, time.perf_counter() - start))

