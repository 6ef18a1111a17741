"""What the command lines share: model/sampling flags, loading the engine, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, TYPE_CHECKING, Callable, NoReturn, Sequence

from .errors import OffloadError, UsageError

if TYPE_CHECKING:
    from .api.registry import ModelListing


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


DRAFT_HELP = ("draft model (default: the model family's default draft), or the target's own low-bit copy: "
              "self-int4, self-int8 (quantized on load, --group-size applies), self (the target's --quantize weights)")


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = "demo") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, required=default_model is None,
                   help="checkpoint directory, GGUF file (.gguf, or a split file's first part), Hugging Face repo id, "
                        "or alias (demo, llama-2-70b, ...)")
    d = g.add_mutually_exclusive_group()
    d.add_argument("--draft", help=DRAFT_HELP)
    d.add_argument("--no-draft", action="store_true", help="plain decoding, no speculation")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default=None, help="float16, bfloat16, float32 or float64 (default: auto)")
    g.add_argument("--gpu-memory", default=None, help="device memory budget, e.g. 20GiB (default: free memory)")
    g.add_argument("--host-memory", default=None,
                   help="host RAM the streamed layers may take, e.g. 20GiB; the rest are read from disk every sweep")
    g.add_argument("--offload-dir", default=None,
                   help="directory for the disk layer store (default: under the runtime home)")
    o = g.add_mutually_exclusive_group()
    o.add_argument("--offload", action="store_true", default=None, help="stream the target's layers from RAM")
    o.add_argument("--no-offload", dest="offload", action="store_false", help="keep the whole target on the device")
    g.add_argument("--plan", default="auto", help="plan file, 'auto' (the planner's matching plan) or 'none'")
    g.add_argument("--max-seq-len", type=int, default=None, help="context window to allocate (default: 4096 or less)")
    add_quantize_args(g)
    g.add_argument("--cache-quantized", action="store_true",
                   help="keep what --quantize made in the runtime's home; later loads read it")
    g.add_argument("--tree", default="auto", help="auto (the plan's choice), static (Sequoia's tree), dynamic (grown "
                   "per step from the draft's probabilities), or a parent array: --tree=-1,0,0,1")
    g.add_argument("--tree-size", type=int, default=None, help="tree budget in nodes, root included (default: plan)")
    g.add_argument("--tree-depth", type=int, default=None, help="tree depth limit (default: the plan's)")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks")


def add_quantize_args(g: Any) -> None:
    """--quantize / --draft-quantize / --group-size: the chat, the batch job, the server and the planner."""
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize the target's linears on load (AWQ/GPTQ checkpoints need no flag)")
    g.add_argument("--draft-quantize", choices=("int8", "int4"), default=None, help="quantize the draft on load")
    g.add_argument("--group-size", type=int, default=None, help="columns per quantization group (default 128; -1: "
                   "per channel)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: generation_config)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply (default: 256)")
    g.add_argument("--seed", type=int, default=None, help="random seed (same seed, same output)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed}


def format_model_list(rows: Sequence["ModelListing"]) -> str:
    """The `--list-models` table: alias, repo id, default draft, parameters, fp16 and int4 checkpoint sizes."""
    table = [("alias", "repo", "default draft", "params", "fp16", "int4")]
    table += [(r.alias, r.repo, r.draft or "-", f"{r.params / 1e9:.2f}B", f"{r.fp16_bytes / 1e9:.1f} GB",
               f"{r.int4_bytes / 1e9:.1f} GB") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {3, 4, 5}  # numbers line up on the right
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in table]
    return "\n".join(lines + ["", "int4: group-128 AWQ (4-bit weights, an fp16 scale and a 4-bit zero per 128 "
                                   "inputs; embeddings, lm_head and norms fp16). GB = 10^9 bytes."])


def check_sampling_args(args: argparse.Namespace) -> None:
    """Bad sampling flags are usage errors: reported before minutes of loading."""
    from .api.options import check_given

    check_given(args.temperature, args.top_p, args.max_new_tokens, args.seed)


def describe_error(e: Exception) -> str:
    """One line for an error: a user error's own message; anything else (a bug) with its type."""
    return str(e) if isinstance(e, OffloadError) else f"{type(e).__name__}: {e}"


def load_engine(args: argparse.Namespace, batch_size: int = 1, device: str | None = None):
    from .api.engine import Engine

    check_sampling_args(args)
    draft: str | bool | None = False if args.no_draft else args.draft
    plan = None if args.plan == "none" else args.plan
    return Engine.from_pretrained(args.model, draft=draft, device=device or args.device, dtype=args.dtype,
                                  offload=args.offload, gpu_memory=args.gpu_memory, max_seq_len=args.max_seq_len,
                                  host_memory=args.host_memory, offload_dir=args.offload_dir,
                                  batch_size=batch_size, plan=plan, progress=sys.stderr.isatty(),
                                  quantize=args.quantize, group_size=args.group_size,
                                  draft_quantize=args.draft_quantize, cache_quantized=args.cache_quantized,
                                  tree=tree_arg(args.tree), tree_size=args.tree_size, tree_depth=args.tree_depth)


def tree_arg(text: str) -> str | list[int]:
    """--tree: a mode name, or a comma-separated parent array (checked, with the other tree options, by the engine)."""
    if "," not in text and not text.lstrip("-").isdigit():
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--tree: cannot read {text!r} as a parent array; write it like -1,0,0,1") from None


def run_main(main: Callable[[], int | None], debug: bool | None = None) -> NoReturn:
    """Run a command's main: user errors become one line and an exit status, never a traceback."""
    debug = ("--debug" in sys.argv[1:]) if debug is None else debug
    try:
        code = main() or 0
    except OffloadError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 0
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as e:  # noqa: BLE001 - the last line of defence: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run again with --debug for the traceback, and please report it)",
              file=sys.stderr)
        code = 1
    sys.exit(code)

