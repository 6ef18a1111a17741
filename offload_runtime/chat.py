"""Chat in the terminal: `python -m offload_runtime.chat --model llama-2-70b-chat`.

Replies stream token by token; the conversation's K/V stays cached across turns; a dim line after each reply
gives tokens, tokens/s, tokens per step and the sweep's GB/s. Ctrl-C stops a reply and keeps the session,
Ctrl-D quits. With stdin not a terminal, each input line is one message and replies are printed plainly.
"""
from __future__ import annotations

import io
import signal
import sys
import traceback

from .cli import (ArgumentParser, add_model_args, add_sampling_args, describe_error, format_model_list,
                  load_engine, run_main, sampling_kwargs)
from .errors import OffloadError, UsageError

HELP = """commands:
  /reset   forget the conversation (keeps the model loaded)
  /stats   statistics of the last reply
  /help    this text
  /quit    leave (Ctrl-D too); Ctrl-C stops the current reply"""


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(prog="python -m offload_runtime.chat", description="Chat with a model (default: the demo pair).")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--list-models", action="store_true",
                   help="print the model aliases with their repos, default drafts and sizes, then exit")
    return p.parse_args(argv)


def stats_line(engine, stats) -> str:
    tps = stats.new_tokens / stats.time_s if stats.time_s else 0.0
    parts = [f"{stats.new_tokens} tokens", f"{tps:.1f} tok/s", f"{stats.tokens_per_step:.2f} tokens/step"]
    sweeps = engine.sweep_stats()
    if sweeps:
        recent = sweeps[-max(1, stats.steps + stats.prefill_sweeps):]
        total_b, total_s = sum(s.bytes for s in recent), sum(s.wall_s for s in recent)
        parts.append(f"sweep {total_b / total_s / 1e9:.1f} GB/s" if total_s else "sweep n/a")
    return ", ".join(parts)


def stats_report(engine, stats) -> str:
    lines = [stats_line(engine, stats),
             f"steps {stats.steps} (+{stats.prefill_sweeps} prefill-only sweeps), prompt {stats.prompt_tokens} tokens, "
             f"{stats.prefill_tokens} run as prefill",
             f"tokens per step histogram: {stats.histogram()}",
             "acceptance by depth: " + ", ".join(f"{a:.2f}" for a in stats.acceptance_by_depth())]
    t = engine.last_call
    if t.steps:
        lines.append(f"time per step: draft {t.draft_s / t.steps * 1e3:.1f} ms, sweep {t.sweep_s / t.steps * 1e3:.1f} ms, "
                     f"host {t.host_s / t.steps * 1e3:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_models:
        from .api.registry import list_models

        print(format_model_list(list_models()))
        return 0
    engine = load_engine(args)
    if engine.tokenizer is None:  # said now, not after the first message is typed
        raise UsageError(f"{engine.name} ships no tokenizer, so it cannot chat: put the model's tokenizer files "
                         f"(tokenizer.json, tokenizer_config.json) in its directory, or send token ids through "
                         f"the Python API or python -m offload_runtime.batch")
    # Bytes that are not UTF-8 become lone surrogates instead of ending the session inside input(); the
    # text layer refuses them with a message, and the next line is read as usual.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    dim, reset = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    session = engine.session()

    def start() -> None:
        session.reset()
        if args.system:
            session.messages.append({"role": "system", "content": args.system})

    start()
    if interactive:
        tree = len(engine.tree_for(engine.sampling_params(**sampling_kwargs(args))))
        print(f"{dim}{engine.name}: {'speculative, ' + str(tree) + '-node trees' if engine.draft else 'plain decoding'}"
              f"{', offloaded' if engine.offloaded else ''}. /help for commands.{reset}")

    def on_sigint(signum, frame):
        if session.streaming:
            session.interrupted = True  # the reply stops after the current step; the session stays
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    status = 0  # piped input: a failed turn makes the exit status non-zero, after the remaining lines ran
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return status
        except KeyboardInterrupt:
            print()
            continue
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            cmd = message.split()[0]
            if cmd in ("/quit", "/exit"):
                return status
            if cmd == "/reset":
                start()
                print(f"{dim}(conversation cleared){reset}")
            elif cmd == "/stats":
                last = engine.last_stats[0] if engine.last_stats else None
                print(f"{dim}{stats_report(engine, last) if last else '(no reply yet)'}{reset}")
            elif cmd == "/help":
                print(HELP)
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        said = False
        try:
            for piece in session.send(message, **sampling_kwargs(args)):
                sys.stdout.write(piece)
                sys.stdout.flush()
                said = True
        except Exception as e:  # noqa: BLE001 - this turn failed; the session and its history stay
            if said:
                print()
            print(turn_error(e, args.debug), file=sys.stderr)
            status = status if interactive else max(status, getattr(e, "exit_code", 1))
            continue
        print()
        if session.interrupted:
            print(f"{dim}(stopped){reset}")
        elif session.request.finish_reason == "context":
            longer = engine.max_seq_len < engine.target.args.max_position_embeddings
            print(f"{dim}(the {engine.max_seq_len}-token context window is full; /reset starts a new "
                  f"conversation{', a larger --max-seq-len allows a longer one' if longer else ''}){reset}")
        stats = engine.last_stats[0]
        print(f"{dim}[{stats_line(engine, stats)}]{reset}", file=sys.stdout if interactive else sys.stderr)


def turn_error(e: Exception, debug: bool) -> str:
    """The one line a failed turn prints (a traceback before it with --debug, for errors that are bugs)."""
    if isinstance(e, OffloadError):
        return f"error: {describe_error(e)}"
    if debug:
        traceback.print_exc()
    return (f"error: {describe_error(e)} (this message was not answered; the session goes on; --debug shows the "
            f"traceback, please report it)")


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
