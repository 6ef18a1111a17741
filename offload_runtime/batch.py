"""Batch jobs: `python -m offload_runtime.batch --model M --input prompts.jsonl --output out.jsonl`.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}, optionally with max_new_tokens,
temperature, top_p, seed, stop, ignore_eos. Output lines: id, text, token counts, finish reason, stats and a
fingerprint of what produced the text (the prompt or messages, the sampling settings and the model).

A job may run for hours on a large model, so it loses nothing and refuses what is wrong before the model loads:
- each problem of an input record is reported as `file:line: reason; skipped`, and the job goes on; a record
  whose decoding fails is reported with its id and not written (a rerun retries it) while the others run on;
- the output must be a regular file or a new path in an existing directory, not the input, and a results file
  of this tool when it exists (so resuming never cuts someone else's file); it is locked (flock on the file
  itself, whatever path names it) before it is read: a second job on it stops at once, naming the holder;
- records are appended one at a time with fsync, so a killed job loses only the records in flight; rerunning
  the same command resumes, skipping the ids already there, after cutting a record the kill tore in half; an id
  there whose fingerprint differs (another job's record) stops the job, so unrelated output never counts as done;
- an input with no record to run is an error, and a job that writes nothing leaves no new output file behind.
Under torchrun each rank takes every WORLD_SIZE-th record and writes `OUTPUT.rankN`; `--merge` joins the part
files into OUTPUT, after every part has been read and checked (an id in two of them with two fingerprints
merges nothing).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .cli import (ArgumentParser, add_model_args, add_sampling_args, check_sampling_args, describe_error,
                  load_engine, run_main)
from .errors import BusyError, OffloadError, UsageError

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos")
RECORD_FIELDS = ("id", "prompt", "messages", *SAMPLING_FIELDS)
RESULT_FIELDS = ("id", "text", "finish_reason")  # in every output line
FINGERPRINT = "fingerprint"  # the last field of an output line; absent from lines of versions before it
RESULT_HEAD = '{"id": '  # how every output line starts (json.dumps of a dict whose first key is "id")
RESULT_AFTER_ID = ', "text": '
RECORD_BYTES, TOKEN_BYTES = 512, 16  # an output line's size, generously: fields and stats, and per token of text
FAILURES_BEFORE_STOP = 8  # the job stops when this many records (at least a batch's worth) fail before any works

Warn = Callable[[str], None]


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(prog="python -m offload_runtime.batch", description="Run a JSONL file of prompts.")
    add_model_args(p, default_model="demo")
    add_sampling_args(p)
    p.add_argument("--input", help="JSONL file: one {id, prompt | messages, ...} per line")
    p.add_argument("--output", required=True, help="JSONL results (resumed when it exists)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together, sharing each sweep")
    p.add_argument("--merge", action="store_true", help="merge OUTPUT.rank* part files into OUTPUT and exit")
    return p.parse_args(argv)


# --- input


@dataclass
class Record:
    line: int
    id: str | int
    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    sampling: dict[str, Any]


def id_key(value: str | int) -> str:
    """Ids are compared as text: 1 and "1" are one record, as they are to most readers of the output."""
    return str(value)


def open_input(path: Path) -> BinaryIO:
    if str(path) == "-" and not path.exists():
        raise UsageError("--input - (standard input) is not supported: a job rereads its input to resume; save the "
                         "records to a file and give its path")
    try:
        return open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read input {path}: {e.strerror}") from None


@dataclass
class Records:
    good: list[Record]  # in file order
    bad: int  # lines skipped, each reported


def read_records(f: BinaryIO, path: Path, warn: Warn) -> Records:
    """Valid records in file order. Each bad line is reported (`file:line: reason; skipped`), each unknown field
    once; everything that can be checked without the model is checked here, so no bad record reaches a batch."""
    seen: dict[str, tuple[int, Any]] = {}
    unknown: set[str] = set()
    records = []
    lines = 0  # not blank
    for n, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        lines += 1
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError:
            warn(f"{path}:{n}: not valid UTF-8; skipped")
            continue
        except json.JSONDecodeError as e:
            warn(f"{path}:{n}: not valid JSON ({e.msg}); skipped")
            continue
        for k in obj if isinstance(obj, dict) else ():
            if k not in RECORD_FIELDS and k not in unknown:
                unknown.add(k)
                warn(f"{path}:{n}: unknown field {k!r} is ignored (a record has id, prompt or messages, and "
                     f"{', '.join(SAMPLING_FIELDS)}); not reported again")
        problem = check_record(obj)
        if problem:
            warn(f"{path}:{n}: {problem}; skipped")
            continue
        key = id_key(obj["id"])
        if key in seen:
            first, value = seen[key]
            same = "" if value == obj["id"] else f" (as {json.dumps(value)}: ids are compared as text)"
            warn(f"{path}:{n}: id {json.dumps(obj['id'])} is already on line {first}{same}; skipped")
            continue
        seen[key] = (n, obj["id"])
        records.append(Record(n, obj["id"], obj.get("prompt"), obj.get("messages"),
                              {k: obj[k] for k in SAMPLING_FIELDS if k in obj}))
    return Records(records, lines - len(records))


def check_record(obj: Any) -> str | None:
    """Why a parsed input line is not a record the job can run; None when it is one."""
    from .api.options import check_given
    from .api.text import check_messages, check_prompt, check_text, normalise_stop

    if not isinstance(obj, dict):
        return "a record must be a JSON object"
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return "a record needs an id (a non-empty string or an integer)"
    if ("prompt" in obj) == ("messages" in obj):
        return "a record needs exactly one of prompt and messages"
    try:
        if isinstance(rid, str):
            check_text(rid, "the id")
        check_prompt(obj["prompt"]) if "prompt" in obj else check_messages(obj["messages"])
        check_given(obj.get("temperature"), obj.get("top_p"), obj.get("max_new_tokens"), obj.get("seed"),
                    obj.get("ignore_eos"))
        normalise_stop(obj.get("stop"))
    except UsageError as e:
        return str(e)
    return None


def model_key(name: str) -> str:
    """The model's identity as plans know it (an absolute path, or hf:owner/name), without loading or downloading
    it: a repo id not yet downloaded gets the identity its snapshot in the hub cache will have."""
    from .api.plans import model_identity
    from .api.registry import resolve_name

    resolved = resolve_name(name)
    path = Path(resolved).expanduser()
    return model_identity(path) if path.exists() else f"hf:{resolved}"


@dataclass(frozen=True)
class Settings:
    """What of the command line decides a record's result. --device, --dtype and --draft are left out: they change
    how the text is computed, not which text is asked for (--quantize swaps the weights, so it is in)."""
    model: str  # model_key of --model
    quantize: str | None  # "int4/g128"-like, or None
    flags: dict[str, Any]  # the sampling flags given

    @classmethod
    def of(cls, args: Any) -> "Settings":
        from .weights.quantized import DEFAULT_GROUP_SIZE

        quantize = f"{args.quantize}/g{args.group_size or DEFAULT_GROUP_SIZE}" if args.quantize else None
        flags = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                   ("max_new_tokens", args.max_new_tokens), ("seed", args.seed)) if v is not None}
        return cls(model_key(args.model), quantize, flags)

    def sampling(self, r: Record) -> dict[str, Any]:
        """A record's sampling settings: its own, else the flags' (the flags' seed is made per record later)."""
        return {**self.flags, **r.sampling}

    def fingerprint(self, r: Record) -> str:
        from .api.home import short_hash
        from .api.options import DEFAULT_MAX_NEW_TOKENS
        from .api.text import normalise_stop

        s = self.sampling(r)
        # Spellings of one setting hash alike, so resuming with a default written out (or left out) still matches.
        s.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        s.update({k: float(s[k]) for k in ("temperature", "top_p") if k in s})
        s["stop"], s["ignore_eos"] = list(normalise_stop(s.get("stop"))), bool(s.get("ignore_eos"))
        return short_hash({"model": self.model, "quantize": self.quantize, "prompt": r.prompt,
                           "messages": r.messages, "sampling": s})


@dataclass(frozen=True)
class Task:
    record: Record
    fingerprint: str  # written with its result


def other_job(where: str, rid: str, output: Path, fix: str) -> UsageError:
    return UsageError(f"{where}: id {rid} is already in {output} from another job (its prompt, sampling settings or "
                      f"model differ); {fix}")


def pending(records: list[Record], done: dict[str, str | None], settings: Settings, input_path: Path, output: Path,
            warn: Warn) -> list[Task]:
    """The records still to run. An id already written with another fingerprint is another job's record: using
    it would hand this job's reader someone else's text, so it stops the job."""
    tasks, unchecked = [], 0
    for r in records:
        fingerprint = settings.fingerprint(r)
        key = id_key(r.id)
        if key not in done:
            tasks.append(Task(r, fingerprint))
        elif done[key] is None:
            unchecked += 1
        elif done[key] != fingerprint:
            raise other_job(f"{input_path}:{r.line}", json.dumps(r.id), output,
                            f"give a new --output, or delete {output} on purpose to run these records again")
    if unchecked:
        warn(f"{output}: {unchecked} of the ids already there have no fingerprint (an older version wrote them), so "
             f"they count as done unchecked; if they may be another job's, give a new --output")
    if len(tasks) < len(records):
        warn(f"resuming: {len(records) - len(tasks)} of {len(records)} records already in {output}")
    return tasks


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local: int  # the rank's GPU on its node


def ranks() -> Ranks:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; one job of one rank without torchrun."""
    def read(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"{name}={raw!r} is not a whole number; torchrun sets RANK and WORLD_SIZE (unset them "
                             f"to run a single job)") from None

    world, rank = read("WORLD_SIZE", 1), read("RANK", 0)
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world}: it must be at least 1 (unset it to run a single job)")
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} with WORLD_SIZE={world}: a rank is from 0 to {world - 1}")
    local = read("LOCAL_RANK", rank)
    if local < 0:
        raise UsageError(f"LOCAL_RANK={local}: it must be at least 0")
    return Ranks(rank, world, local)


# --- output


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _check_output_path(path: Path, input_path: Path | None) -> None:
    """Before opening: a regular file (not the input) or a new name in an existing directory."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise UsageError(f"cannot use --output {path}: {e.strerror}") from None
    if st is None:
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent != path.parent and parent.is_dir():
            raise UsageError(f"the directory of --output {path} does not exist; create it "
                             f"(mkdir -p {path.parent}) or give another path")
        if not parent.is_dir():
            raise UsageError(f"--output {path} cannot be created: {parent} is a file, not a directory")
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--output {path} is {_kind(st.st_mode)}: results are appended to a file and read back "
                         f"to resume, so give a file path (a new one, or an earlier job's output)")
    if input_path is not None and input_path.exists() and os.path.samefile(path, input_path):
        raise UsageError(f"--output {path} is the input file; give another path for the results")


def _lock_holder(fd: int) -> str:
    """Who holds the flock on fd's file, in words (Linux lists flocks and their processes in /proc/locks)."""
    inode = str(os.fstat(fd).st_ino)
    try:
        rows = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
    except OSError:
        return "another job"
    for row in rows:  # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1311 0 EOF"; waiters have a "->" in column 2
        if len(row) >= 6 and row[1] == "FLOCK" and row[5].rsplit(":", 1)[-1] == inode and row[4] != str(os.getpid()):
            try:
                cmd = Path(f"/proc/{row[4]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = ""
            return f"process {row[4]}" + (f" ({cmd.strip()[:160]})" if cmd.strip() else "")
    return "another job"


def lock(fd: int, path: Path, exclusive: bool, warn: Warn) -> None:
    """flock the file without waiting: BusyError, naming the holder, when a running job has it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BusyError(f"{path} is in use by {_lock_holder(fd)}; wait for that job to end (or stop it), or give "
                        f"another --output") from None
    except OSError as e:  # a file system without locks (some network mounts)
        warn(f"cannot lock {path} ({e.strerror}); make sure no other job writes it at the same time")


def _torn_result(tail: bytes) -> bool:
    """Whether an unterminated last line is the start of one of our records (a job killed while writing it)."""
    text = tail.decode("utf-8", errors="ignore")  # the cut may split a character
    if not text.startswith(RESULT_HEAD):
        return RESULT_HEAD.startswith(text)
    try:
        _, end = json.JSONDecoder().raw_decode(text, len(RESULT_HEAD))
    except json.JSONDecodeError:
        return len(text) < len(RESULT_HEAD) + 256  # cut inside the id
    rest = text[end:]
    return rest.startswith(RESULT_AFTER_ID) or RESULT_AFTER_ID.startswith(rest)


@dataclass(frozen=True)
class Written:
    """A record of a results file."""
    key: str  # id_key of its id
    fingerprint: str | None  # None: an older version wrote it


def _result(raw: bytes) -> Written | None:
    try:
        obj = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8
        return None
    if not isinstance(obj, dict) or any(k not in obj for k in RESULT_FIELDS):
        return None
    rid, fingerprint = obj["id"], obj.get(FINGERPRINT)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or not isinstance(fingerprint, (str, type(None))):
        return None
    return Written(id_key(rid), fingerprint)


def scan_results(f: BinaryIO, path: Path, on_line: Callable[[int, Written, bytes], None], fix: str) -> int | None:
    """Read a results file from its start: on_line(line number, record, raw line) for each record. A line that is
    not one of our records raises UsageError (`path:line: ...; ` + fix). Returns the byte offset of a torn last
    record (None when the file ends cleanly)."""
    f.seek(0)
    offset = 0
    for n, raw in enumerate(f, start=1):
        if not raw.endswith(b"\n"):
            if _torn_result(raw):
                return offset
            raise UsageError(f"{path}:{n}: the last line is not a result record of this tool; {fix}")
        if raw.strip():
            record = _result(raw)
            if record is None:
                raise UsageError(f"{path}:{n}: not a result record of this tool; {fix}")
            on_line(n, record, raw)
        offset += len(raw)
    return None


class Output:
    """A results file held by this job: checked and locked before the model loads, appended to one fsynced
    record at a time through the locked descriptor."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path, self.fd = path, fd
        self.created = created  # by this job: removed again if the job writes nothing
        self.written = 0

    @classmethod
    def open(cls, path: Path, warn: Warn, input_path: Path | None = None) -> "Output":
        _check_output_path(path, input_path)
        try:
            # O_NONBLOCK: should the path turn into a pipe or device between the check and here, open must not
            # wait for a reader (fstat refuses it next).
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK
            try:
                fd, created = os.open(path, flags | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(path, flags, 0o644), False
        except OSError as e:
            raise UsageError(f"cannot write --output {path}: {e.strerror}; give a path in a directory you can "
                             f"write to") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise UsageError(f"--output {path} is {_kind(mode)}; give a file path")
            lock(fd, path, exclusive=True, warn=warn)
            if not _names(path, fd):
                # a job that wrote nothing removed the file it had made between our open and our lock
                raise BusyError(f"{path} was removed by another job as this one opened it; run the command again")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, created)

    def done_ids(self, warn: Warn) -> dict[str, str | None]:
        """The ids already written (as id_key), each with its fingerprint; a record torn by a killed job is cut
        off, so it runs again."""
        done: dict[str, str | None] = {}

        def add(n: int, record: Written, raw: bytes) -> None:
            done[record.key] = record.fingerprint
        with os.fdopen(os.dup(self.fd), "rb") as f:
            torn = scan_results(f, self.path, add,
                                "give another --output (resuming only continues an output of this tool)")
        if torn is not None:
            os.ftruncate(self.fd, torn)
            warn(f"{self.path}: cut the partial record a killed job left at its end; that record runs again")
        return done

    def check_space(self, need: int, warn: Warn) -> None:
        """Refuse a full disk before the model loads; warn when the estimate `need` (bytes) may not fit."""
        from .memory import fmt_bytes

        st = os.fstatvfs(self.fd)
        free = st.f_bavail * st.f_frsize
        if free < min(need, RECORD_BYTES):
            raise UsageError(f"the disk holding {self.path} is full ({fmt_bytes(free)} free); free some space or "
                             f"give an --output on another disk")
        if free < need:
            warn(f"the disk holding {self.path} has {fmt_bytes(free)} free and this job may write up to "
                 f"{fmt_bytes(need)}; it stops cleanly if the disk fills (rerun to resume after freeing space)")

    def write_line(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            raise OffloadError(f"cannot write to {self.path}: {e.strerror}; the {self.written} records written "
                               f"before are kept: {'free disk space' if full else 'fix the cause'}, then rerun the "
                               f"same command to resume") from None
        self.written += 1

    def write(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        assert data.startswith(RESULT_HEAD.encode()), "the torn-record check relies on this prefix"
        self.write_line(data)

    def close(self) -> None:
        # A job that wrote nothing leaves no file that looks like its results. Removed while still locked, so no
        # other job holds it (one that opened it meanwhile sees it gone once it has the lock, in open).
        if self.created and self.written == 0 and os.fstat(self.fd).st_size == 0 and _names(self.path, self.fd):
            os.unlink(self.path)
        os.close(self.fd)  # releases the lock


def _names(path: Path, fd: int) -> bool:
    """Whether path (still) names the file open as fd."""
    try:
        st, mine = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def merge(output: Path, warn: Warn) -> int:
    """Join OUTPUT.rankN into OUTPUT (ids already there are skipped). Every part is read and checked first;
    a part still being written, a bad line anywhere, or an id there twice with two fingerprints merges nothing."""
    prefix = output.name + ".rank"
    parts = sorted(p for p in output.parent.glob(glob.escape(prefix) + "*") if p.name[len(prefix):].isdigit())
    if not parts:
        raise UsageError(f"no part files {prefix}N next to {output}")
    out = Output.open(output, warn)
    files: list[BinaryIO] = []
    try:
        have = out.done_ids(warn)
        holder: dict[str, Path] = {}  # the part of each id to merge (the ids not here are in the output already)
        chosen: list[set[int]] = []
        unchecked = 0
        for part in parts:
            f = open_input(part)
            files.append(f)
            lock(f.fileno(), part, exclusive=False, warn=warn)
            lines: set[int] = set()

            def take(n: int, record: Written, raw: bytes) -> None:
                nonlocal unchecked
                if record.key not in have:
                    have[record.key] = record.fingerprint
                    holder[record.key] = part
                    lines.add(n)
                elif None in (record.fingerprint, have[record.key]):
                    unchecked += 1
                elif record.fingerprint != have[record.key]:
                    raise other_job(f"{part}:{n}", record.key, holder.get(record.key, output),
                                    "nothing was merged: merge into a new --output, or remove the other job's file")
            fix = "nothing was merged: fix or delete that line, then merge again"
            if scan_results(f, part, take, fix) is not None:
                warn(f"{part}: its last record is partial (its job was killed) and is not merged; rerun that rank "
                     f"to finish it")
            chosen.append(lines)
        if unchecked:
            warn(f"{unchecked} records have ids already merged and no fingerprint to compare (an older version wrote "
                 f"them); they were taken as the same records and skipped")
        for f, part, lines in zip(files, parts, chosen):
            scan_results(f, part, lambda n, record, raw: out.write_line(raw) if n in lines else None, "")
    finally:
        for f in files:
            f.close()
        out.close()
    added = sum(len(lines) for lines in chosen)
    warn(f"merged {added} records from {len(parts)} part files into {output}")
    return added


# --- the job


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output)

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.merge:
        merge(output, warn)
        return 0
    if not args.input:
        raise UsageError("--input is required (or --merge)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    job = ranks()
    if job.world > 1:
        output = output.with_name(f"{output.name}.rank{job.rank}")
    input_path = Path(args.input)
    with open_input(input_path) as f:
        # The output first, before anything slow: a second job on it stops here at once.
        out = Output.open(output, warn, input_path)
        try:
            finished = out.done_ids(warn)
            check_sampling_args(args)
            read = read_records(f, input_path, warn)
            if not read.good:
                why = (f"its {read.bad} records were all bad (reported above); fix them" if read.bad else
                       "it is empty or blank; give a file with one {id, prompt | messages} per line")
                raise UsageError(f"{input_path}: no records to run: {why}")
            records = read.good[job.rank::job.world]
            if not records:  # the others' shares hold them: not this rank's mistake
                warn(f"rank {job.rank}: no records to run ({len(read.good)} records for {job.world} ranks)")
                return 0
            settings = Settings.of(args)
            todo = pending(records, finished, settings, input_path, out.path, warn)
            if not todo:
                return 0
            try:
                return run_job(args, settings, todo, input_path, out, job, warn)
            except KeyboardInterrupt:
                done = len(records) - len(todo) + out.written
                warn(f"interrupted: {done} of {len(records)} records written to {out.path}; rerun the same command "
                     f"to resume")
                raise
        finally:
            out.close()


def run_job(args: Any, settings: Settings, todo: list[Task], input_path: Path, out: Output, job: Ranks,
            warn: Warn) -> int:
    from .api.options import DEFAULT_MAX_NEW_TOKENS, MAX_SEED

    tokens_each = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    out.check_space(sum(RECORD_BYTES + TOKEN_BYTES * t.record.sampling.get("max_new_tokens", tokens_each)
                        for t in todo), warn)
    # More rows than records would only allocate KV caches that no record uses, and slow every step.
    batch_size = min(args.batch_size, len(todo))
    device = args.device
    if job.world > 1 and device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{job.local % torch.cuda.device_count()}"
    engine = load_engine(args, batch_size=batch_size, device=device)
    requests, kept = [], []
    for task in todo:
        r = task.record
        sampling = settings.sampling(r)
        if "seed" in settings.flags and "seed" not in r.sampling:
            # a record's seed does not depend on the others (nor on which of them are already done)
            sampling["seed"] = (settings.flags["seed"] + r.line) % (MAX_SEED + 1)
        try:
            requests.append(engine.request(r.prompt, messages=r.messages, **sampling))
            kept.append(task)
        except OffloadError as e:
            warn(f"{input_path}:{r.line}: {e}; skipped")
        except Exception as e:  # noqa: BLE001 - a surprise in one record must not stop the others
            warn(f"{input_path}:{r.line}: id {json.dumps(r.id)}: {describe_error(e)}; skipped (please report it)")
    give_up = max(FAILURES_BEFORE_STOP, 2 * batch_size)
    bar = _progress(len(requests))
    t0, tokens, failed = time.perf_counter(), 0, 0
    try:
        for i, result in engine.run(requests):
            r = kept[i].record
            if result.error is not None:
                failed += 1
                warn(f"{input_path}:{r.line}: id {json.dumps(r.id)} failed: {describe_error(result.error)}; not "
                     f"written (a rerun retries it)")
                if failed >= give_up and out.written == 0:
                    raise OffloadError(f"the first {failed} records all failed, the last with: "
                                       f"{describe_error(result.error)}; stopping: fix the cause and rerun")
                continue
            tokens += len(result.token_ids)
            s = result.stats
            out.write({"id": r.id, "text": result.text, "prompt_tokens": len(result.prompt_token_ids),
                       "completion_tokens": len(result.token_ids), "finish_reason": result.finish_reason,
                       "stats": {"steps": s.steps, "tokens_per_step": round(s.tokens_per_step, 3),
                                 "time_s": round(s.time_s, 3)}, FINGERPRINT: kept[i].fingerprint})
            if bar is not None:
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):.1f} tok/s")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    warn(f"wrote {out.written} records to {out.path} ({tokens} tokens, "
         f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s)")
    if failed:
        warn(f"{failed} of {len(requests)} records failed (reported above); rerun the same command to retry them")
        return 1
    return 0


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="batch", file=sys.stderr)


def entry() -> None:
    run_main(main)


if __name__ == "__main__":
    entry()
