"""The batch job's resume and merge tell this job's records from another's, an input with nothing to run is an
error that leaves no file, --batch-size never exceeds the records to run, and Ctrl-C says what was kept."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CLI_ENV, one_line_error, read_jsonl, run_cli, write_jsonl

from offload_runtime import batch
from offload_runtime.errors import UsageError

BATCH = "offload_runtime.batch"


def job(model, inp: Path, out: Path, *flags) -> list[str]:
    return [*map(str, ["--model", model, "--no-draft", "--device", "cpu", "--input", inp, "--output", out,
                       "--temperature", "0", "--max-new-tokens", "3", *flags])]


def prompts(n: int, start: int = 5) -> list[dict]:
    return [{"id": i, "prompt": [start + i, 6, 7]} for i in range(n)]


# --- resume and merge: fingerprints


@pytest.fixture
def finished(tiny_pair, tmp_path) -> tuple[Path, Path, bytes]:
    """A finished job's input and output (ids 0..3), and the output's bytes."""
    inp = write_jsonl(tmp_path / "many.jsonl", prompts(4))
    out = tmp_path / "out.jsonl"
    assert batch.main(job(tiny_pair[0], inp, out)) == 0
    return inp, out, out.read_bytes()


def test_resume_refuses_records_another_job_wrote(tiny_pair, finished, tmp_path):
    inp, out, before = finished
    # The same command resumes: everything is there, nothing runs again.
    assert batch.main(job(tiny_pair[0], inp, out)) == 0
    assert out.read_bytes() == before
    assert all(len(r[batch.FINGERPRINT]) == 16 for r in read_jsonl(out))
    other_prompts = write_jsonl(tmp_path / "new.jsonl", prompts(3, start=40))
    moved = shutil.copytree(tiny_pair[0], tmp_path / "other-model")  # another checkpoint, the same weights
    for model, new_inp, flags in [(tiny_pair[0], other_prompts, []),
                                  (tiny_pair[0], inp, ["--max-new-tokens", "4"]),
                                  (tiny_pair[0], inp, ["--temperature", "0.5"]),
                                  (moved, inp, [])]:
        with pytest.raises(UsageError, match=r"id 0 is already in .*out.jsonl from another job .*give a new "
                                             r"--output, or delete .*out.jsonl on purpose"):
            batch.main([*job(model, new_inp, out), *flags])
        assert out.read_bytes() == before


def test_resume_checks_before_the_model_loads(finished, tmp_path):
    inp, out, before = finished
    with pytest.raises(UsageError, match="from another job"):  # not "model not found": the check came first
        batch.main(job(tmp_path / "no-such-model", inp, out))
    assert out.read_bytes() == before


def test_resume_matches_a_default_written_out(tiny_pair, finished):
    inp, out, before = finished
    rows = [json.loads(line) for line in inp.read_text().splitlines()]
    for r in rows:
        r["temperature"] = 0  # the record's own setting, as an int: the same as the flag's 0.0
    write_jsonl(inp, rows)
    assert batch.main([*job(tiny_pair[0], inp, out), "--max-new-tokens", "3"]) == 0
    assert out.read_bytes() == before


def test_an_output_without_fingerprints_resumes_with_a_warning(tiny_pair, finished, capsys):
    inp, out, _ = finished
    legacy = [{k: v for k, v in r.items() if k != batch.FINGERPRINT} for r in read_jsonl(out)[:2]]
    write_jsonl(out, legacy)  # as a version before fingerprints wrote ids 0 and 1
    capsys.readouterr()
    assert batch.main(job(tiny_pair[0], inp, out)) == 0
    assert "2 of the ids already there have no fingerprint" in capsys.readouterr().err
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [0, 1, 2, 3] and rows[:2] == legacy


def result(i: int, fingerprint: str | None) -> dict:
    row = {"id": i, "text": f"t{i}", "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "length",
           "stats": {}}
    return row if fingerprint is None else {**row, batch.FINGERPRINT: fingerprint}


def test_merge_refuses_an_id_from_another_job(tmp_path):
    out = tmp_path / "m.jsonl"
    write_jsonl(out, [result(0, "a0"), result(1, "a1")])
    before = out.read_bytes()
    write_jsonl(tmp_path / "m.jsonl.rank0", [result(1, "a1"), result(2, "a2")])  # id 1: the same record
    write_jsonl(tmp_path / "m.jsonl.rank1", [result(3, "a3"), result(0, "b0")])  # id 0: another job's
    one_line_error(run_cli(BATCH, "--output", out, "--merge"), 2,
                   "m.jsonl.rank1:2: id 0 is already in " + str(out) + " from another job")
    assert out.read_bytes() == before
    # Between two parts, and into an output that does not exist yet: it is not created.
    fresh = tmp_path / "n.jsonl"
    write_jsonl(tmp_path / "n.jsonl.rank0", [result(0, "a0")])
    write_jsonl(tmp_path / "n.jsonl.rank1", [result(0, "b0")])
    with pytest.raises(UsageError, match="n.jsonl.rank1:1: id 0 is already in .*n.jsonl.rank0 from another job"):
        batch.main(["--output", str(fresh), "--merge"])
    assert not fresh.exists()
    # The same records (the same fingerprints) merge, each once.
    (tmp_path / "m.jsonl.rank1").write_text(json.dumps(result(3, "a3")) + "\n")
    assert batch.main(["--output", str(out), "--merge"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2, 3]


# --- nothing to run


@pytest.mark.parametrize("content, message", [
    ("", "it is empty or blank"),
    ("\n  \n\n", "it is empty or blank"),
    ('{not json\n{"prompt": "no id"}\n{"id": 1, "prompt": "x", "temperature": -1}\n',
     "its 3 records were all bad (reported above); fix them"),
])
def test_an_input_with_nothing_to_run_is_an_error_and_creates_no_output(content, message, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    out = tmp_path / "out.jsonl"
    proc = run_cli(BATCH, "--model", tmp_path / "no-such-model", "--device", "cpu", "--input", inp, "--output", out)
    one_line_error(proc, 2, f"in.jsonl: no records to run: {message}")
    assert not out.exists()


def test_a_failed_merge_creates_no_output(tmp_path):
    out = tmp_path / "m.jsonl"
    write_jsonl(tmp_path / "m.jsonl.rank0", [result(0, None), "{not json"])
    one_line_error(run_cli(BATCH, "--output", out, "--merge"), 2, "nothing was merged")
    assert not out.exists()


def test_a_rank_whose_share_is_empty_ends_cleanly(tmp_path, monkeypatch):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert batch.main(job(tmp_path / "no-such-model", inp, tmp_path / "out.jsonl")) == 0
    assert not (tmp_path / "out.jsonl.rank2").exists()


# --- --batch-size


def test_batch_size_is_capped_at_the_records_to_run(tiny_pair, tmp_path, monkeypatch):
    sizes = []
    real = batch.load_engine

    def load_engine(args, batch_size: int = 1, device=None):
        sizes.append(batch_size)
        assert batch_size <= 3, "caches for rows no record uses"  # before they are allocated
        return real(args, batch_size=batch_size, device=device)
    monkeypatch.setattr(batch, "load_engine", load_engine)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "out.jsonl"
    assert batch.main([*job(tiny_pair[0], inp, out), "--batch-size", "5000"]) == 0
    rows = read_jsonl(out)
    assert sizes == [3] and [r["id"] for r in rows] == [0, 1, 2]
    write_jsonl(out, rows[:2])  # one left to run after resuming
    assert batch.main([*job(tiny_pair[0], inp, out), "--batch-size", "5000"]) == 0
    assert sizes == [3, 1] and [r["text"] for r in read_jsonl(out)] == [r["text"] for r in rows]


# --- Ctrl-C


def test_sigint_says_what_was_written_and_the_rerun_resumes(tiny_pair, tmp_path):
    n = 40
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.jsonl"
    argv = [*job(tiny_pair[0], inp, out), "--max-new-tokens", "24", "--batch-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", BATCH, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=CLI_ENV, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and lines[0].endswith(f" of {n} records written to {out}; rerun the same command to "
                                                 f"resume"), err
    said, kept = int(lines[0].split()[1]), len(read_jsonl(out))
    # A signal landing between a record's write and its count (a few instructions) leaves one more than said.
    assert 2 <= said <= kept <= said + 1 < n
    rerun = run_cli(BATCH, *argv)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {kept} of {n} records already in {out}" in rerun.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == list(range(n))


def test_standard_input_is_refused_with_the_reason(tmp_path):
    proc = run_cli(BATCH, "--model", tmp_path / "no-such-model", "--input", "-", "--output", tmp_path / "o.jsonl",
                   stdin='{"id": 1, "prompt": "x"}\n')
    one_line_error(proc, 2, "--input - (standard input) is not supported: a job rereads its input to resume")
    assert not (tmp_path / "o.jsonl").exists()
