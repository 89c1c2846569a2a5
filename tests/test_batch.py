"""Batch-system adapters (pilot/batch): scripts, submission, status, cancel, windows.

Slurm, Slurm's Torque wrappers (slurm-wlm-torque) and the local adapter run for real here.
PBS Pro, Torque proper, Cobalt, HTCondor and LSF cannot run on this machine: their scripts are
checked against golden text written from each scheduler's documented directive forms, and their
status parsers against recorded/transcribed command output in tests/data/batch/.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require, scancel, slurm_job_state, wait_for

from pilotfish.errors import ValidationError
from pilotfish.pilot.batch import SCHEDULERS, BatchError, PilotSpec, PilotState, Window, get
from pilotfish.pilot.batch import cobalt, htcondor, lsf, pbs, slurm, torque
from pilotfish.pilot.batch.local import LocalBatch, supervise

DATA = Path(__file__).parent / "data" / "batch"
Q, R, F, X, C, T, M = (PilotState.QUEUED, PilotState.RUNNING, PilotState.FINISHED,
                       PilotState.FAILED, PilotState.CANCELLED, PilotState.TIMEOUT,
                       PilotState.MISSING)

#: A representative pilot: 2 nodes of 64 cores and 4 GPUs for 90 minutes, a site setup line,
#: an env value with quotes, the real head command shape.
SPEC = PilotSpec(
    name="pf-theta-3", nodes=2, walltime_minutes=90, cores_per_node=64,
    workdir=Path("/scratch/proj/pilots/pf-theta-3"),
    head_argv=("/opt/pilotfish/bin/python", "-m", "pilotfish", "pilot", "run", "--server",
               "tcp://login1:5555", "--", "--idle-timeout", "300"),
    queue="debug", project="CSC249", gpus_per_node=4, memory_mb=64000,
    setup=("module load cray-python",),
    env=(("PILOTFISH_LOG", "info"), ("MSG", "it's \"ok\"")))


def golden_cases() -> list[tuple[str, str]]:
    """(golden file, text rendered now) for every scheduler, each with a site directive of its
    own documented kind."""
    r = dataclasses.replace
    return [
        ("slurm.sh.golden", get("slurm").render(r(SPEC, queue="regular",
                                                   directives=("--constraint=knl",)))),
        ("pbs.sh.golden", get("pbs").render(r(SPEC, queue="prod",
                                               directives=("-l filesystems=home:eagle",)))),
        ("torque.sh.golden", get("torque").render(r(SPEC, queue="batch",
                                                     directives=("-m n",)))),
        ("cobalt.sh.golden", get("cobalt").render(
            r(SPEC, queue="debug-cache-quad", directives=("--attrs mcdram=cache:numa=quad",)))),
        ("cobalt.argv.golden", shlex.join(cobalt.submit_argv(
            r(SPEC, queue="debug-cache-quad"), f"{SPEC.workdir}/pilot.sh")) + "\n"),
        ("htcondor.sh.golden", get("htcondor").render(r(SPEC, nodes=1, queue=None))),
        ("htcondor.sub.golden", get("htcondor").render_submit(
            r(SPEC, nodes=1, queue=None, directives=("requirements = (OpSysMajorVer == 8)",)))),
        ("lsf.sh.golden", get("lsf").render(r(SPEC, queue="batch",
                                               directives=("-alloc_flags smt4",)))),
        ("lsf-slots.sh.golden", get("lsf", nnodes=False).render(r(SPEC, queue="normal"))),
        ("local.sh.golden", get("local").render(r(SPEC, queue=None, project=None))),
    ]


def golden(name: str) -> str:
    return dict(golden_cases())[name]


def check_golden(name: str) -> None:
    assert golden(name) == (DATA / name).read_text(), f"{name} differs from its golden text"


# -- golden scripts -------------------------------------------------------------------------------
def test_slurm_script_matches_golden():
    """The Slurm script against the golden text, checked against the sbatch manual's long options
    (--nodes, --ntasks-per-node, --cpus-per-task, --time in minutes, --partition, --account,
    --gpus-per-node, --mem with M suffix, --output/--error with %j). Slurm also runs here: the
    tests below submit real scripts."""
    check_golden("slurm.sh.golden")


def test_pbs_pro_script_matches_documented_directives():
    """PBS Pro cannot run here; the script is checked against the PBS Professional User's Guide
    forms: `-l select=N:ncpus=C:ngpus=G:mem=Mmb` (one chunk per node), `-l place=scatter`,
    `-l walltime=HH:MM:SS`, `-q`, `-A`, `-N`, `-o`/`-e`, and a Polaris-style site directive."""
    check_golden("pbs.sh.golden")
    text = golden("pbs.sh.golden")
    assert "#PBS -l select=2:ncpus=64:ngpus=4:mem=64000mb\n" in text
    assert "#PBS -l walltime=01:30:00\n" in text


def test_torque_script_matches_documented_directives():
    """Torque proper cannot run here (only Slurm's Torque wrappers do, tested below); the script
    is checked against the Torque Administrator Guide forms: `-l nodes=N:ppn=P:gpus=G`,
    `-l walltime=HH:MM:SS`, `-l mem` (the whole job's memory), `-q`, `-A`, `-N`, `-o`/`-e`."""
    check_golden("torque.sh.golden")
    assert "#PBS -l nodes=2:ppn=64:gpus=4\n" in golden("torque.sh.golden")


def test_cobalt_script_and_qsub_match_documentation():
    """Cobalt cannot run here; checked against ALCF's Theta documentation: `qsub -n <nodes>
    -t <minutes> -q <queue> -A <project> --mode script <script>` on the command line, `-O` for
    the job name and output prefix, site extras as `#COBALT` lines."""
    check_golden("cobalt.sh.golden")
    check_golden("cobalt.argv.golden")
    assert golden("cobalt.argv.golden").startswith(
        "qsub -n 2 -t 90 -q debug-cache-quad -A CSC249 -O /scratch/proj/pilots/pf-theta-3/"
        "pf-theta-3 --mode script ")


def test_htcondor_submit_description_matches_documentation():
    """HTCondor cannot run here; the submit description is checked against the condor_submit
    manual's keys (universe, executable, request_cpus/memory/gpus, output/error/log, queue 1);
    +MaxRuntime and periodic_remove carry the walltime."""
    check_golden("htcondor.sh.golden")
    check_golden("htcondor.sub.golden")
    sub = golden("htcondor.sub.golden")
    assert "universe = vanilla\n" in sub and sub.endswith("queue 1\n")
    assert "+MaxRuntime = 5400\n" in sub


def test_htcondor_refuses_multi_node_pilots_and_queues():
    """A glidein is one node: nodes=2 would be two unrelated one-node jobs, not an allocation."""
    with pytest.raises(ValidationError, match="one node"):
        get("htcondor").render(dataclasses.replace(SPEC, queue=None))
    with pytest.raises(ValidationError, match="no queues"):
        get("htcondor").render(dataclasses.replace(SPEC, nodes=1))


def test_lsf_scripts_match_documented_directives():
    """LSF cannot run here; checked against the bsub manual: `-nnodes N` (CSM clusters such as
    OLCF Summit) or `-n` slots with `-R "span[ptile=C]"`, `-gpu "num=G"`, `-W HH:MM`, `-q`,
    `-P`, `-J`, `-o`/`-e` with %J."""
    check_golden("lsf.sh.golden")
    check_golden("lsf-slots.sh.golden")
    assert "#BSUB -nnodes 2\n" in golden("lsf.sh.golden")
    slots = golden("lsf-slots.sh.golden")
    assert '#BSUB -n 128\n#BSUB -R "span[ptile=64]"\n' in slots and "#BSUB -W 01:30\n" in slots


def test_local_script_matches_golden():
    """The local adapter's script (it runs here too, below)."""
    check_golden("local.sh.golden")


def test_every_script_starts_with_bash_and_execs_the_quoted_head():
    for fname, text in golden_cases():
        if not fname.endswith(".sh.golden"):
            continue
        assert text.startswith("#!/bin/bash\n"), fname
        assert "pilotfish: pilot" in text and "\ncd /scratch/proj/pilots/pf-theta-3 " in text
        assert text.endswith("exec /opt/pilotfish/bin/python -m pilotfish pilot run --server "
                             "tcp://login1:5555 -- --idle-timeout 300\n"), fname
        assert "export MSG='it'\"'\"'s \"ok\"'\n" in text, fname
        assert "\nset -e" not in text and "\nset -u" not in text


def test_registry_and_unknown_scheduler():
    assert set(SCHEDULERS) == {"slurm", "pbs", "torque", "cobalt", "htcondor", "lsf", "local"}
    assert isinstance(get("lsf", nnodes=False), lsf.LsfBatch)
    with pytest.raises(BatchError) as err:
        get("sge")
    assert str(err.value) == ("unknown scheduler 'sge'; known: cobalt, htcondor, local, lsf, "
                              "pbs, slurm, torque")


# -- hostile values -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("field,value", [
    ("queue", "debug;rm -rf /"), ("queue", "debug\n#SBATCH --uid=0"), ("project", "p $(id)"),
    ("name", "pf\n#PBS -l select=999"), ("name", "-N evil"), ("workdir", Path("rel/dir")),
    ("workdir", Path("/scratch/my pilots")), ("workdir", Path("/scratch/%j")),
    ("env", (("BAD NAME", "x"),)), ("env", (("X", "a\0b"),)),
    ("setup", ("module load a\rmodule load b",)), ("setup", ("ok\0",)),
    ("directives", ("--x\n--y",)), ("head_argv", ()), ("head_argv", ("/bin/x", "a\0")),
    ("nodes", 0), ("walltime_minutes", True), ("memory_mb", 0)])
def test_hostile_values_are_refused(name, field, value):
    base = dataclasses.replace(SPEC, nodes=1, queue=None) if name == "htcondor" else SPEC
    spec = dataclasses.replace(base, **{field: value})
    with pytest.raises(ValidationError):
        get(name).render(spec)


def test_hostile_argv_and_env_are_inert_when_the_script_runs(tmp_path):
    """Command substitutions, backticks and quotes in head argv and env values reach the head
    literally; nothing runs."""
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker})`touch {marker}`'\"; touch {marker}"
    spec = PilotSpec(name="pf-hostile", nodes=1, walltime_minutes=5, cores_per_node=1,
                     workdir=tmp_path, head_argv=("/bin/sh", "-c", 'printf "%s|%s" "$1" "$MSG"',
                                                  "sh", evil),
                     env=(("MSG", evil + "\n second line"),))
    script = tmp_path / "pilot.sh"
    script.write_text(get("local").render(spec))
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n", 1)[1] == f"{evil}|{evil}\n second line"
    assert not marker.exists()


def test_failing_setup_line_is_reported_and_the_head_still_runs(tmp_path):
    spec = PilotSpec(name="pf-setup", nodes=1, walltime_minutes=5, cores_per_node=1,
                     workdir=tmp_path, head_argv=("/bin/echo", "head ran"),
                     setup=("module load no-such-module", "false", "export OK=1"))
    script = tmp_path / "pilot.sh"
    script.write_text(get("local").render(spec))
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.endswith("head ran\n"), (r.stdout, r.stderr)
    assert "pilotfish: setup line 13 failed (exit 127): module load no-such-module" in r.stderr
    assert "pilotfish: setup line 14 failed (exit 1): false" in r.stderr
    assert "pilotfish: 2 setup line(s) failed; starting the head anyway" in r.stderr


# -- status parsing from recorded output ----------------------------------------------------------
def states(got: dict) -> dict:
    return {k: v.state for k, v in got.items()}


def test_slurm_parsing_of_recorded_squeue_and_sacct_output():
    """Recorded from Slurm 22.05 on this machine (squeue -t all and sacct -c)."""
    got, garbage = slurm.parse_squeue((DATA / "slurm_squeue.txt").read_text(), ["85", "86", "87"])
    assert states(got) == {"85": R, "86": Q, "87": Q} and not garbage
    assert got["85"].nodes == ("node1", "node2", "node3", "node4")
    assert got["86"].reason == "Resources"
    got, _ = slurm.parse_squeue((DATA / "slurm_squeue_ended.txt").read_text(),
                                ["81", "82", "83", "84"])
    assert states(got) == {"81": F, "82": C, "83": F, "84": C}
    got, _ = slurm.parse_sacct((DATA / "slurm_sacct_c.txt").read_text(), ["85", "86", "87"])
    assert states(got) == {"85": C, "86": C, "87": X}
    assert got["87"].reason == "exit 3" and got["86"].nodes == ()


@pytest.mark.parametrize("word,state", [
    ("CANCELLED by 1000", C), ("TIMEOUT", T), ("DEADLINE", T), ("OUT_OF_MEMORY", X),
    ("NODE_FAIL", X), ("BOOT_FAIL", X), ("PREEMPTED", C), ("SUSPENDED", Q), ("REQUEUED", Q),
    ("CONFIGURING", R), ("COMPLETING", R), ("EXPLODED", M)])
def test_slurm_state_words(word, state):
    got, _ = slurm.parse_sacct(f"7|{word}|0:0|node1\n", ["7"])
    assert got["7"].state == state
    if state == M:
        assert got["7"].raw == f"7|{word}|0:0|node1" and "could not parse" in got["7"].reason


def test_pbs_pro_parsing_of_transcribed_qstat_json():
    """Transcribed `qstat -x -f -F json` following the PBS Pro reference guide (job_state
    letters, Exit_status -29 = walltime kill, substate 91 = deleted); PBS Pro cannot run here."""
    ids = [f"100{i}.polaris-pbs-01" for i in range(1, 10)] + ["1010", "1003"]
    got = pbs.parse_qstat_json((DATA / "pbs_qstat.json").read_text(), ids)
    assert [got[i].state for i in ids] == [R, Q, F, T, C, Q, X, M, R, M, F]
    assert got["1001.polaris-pbs-01"].nodes == ("x3001c0s1b0n0", "x3001c0s1b1n0")
    assert got["1002.polaris-pbs-01"].reason.startswith("Not Running: Insufficient")
    assert got["1007.polaris-pbs-01"].reason == "exit 1"
    assert got["1008.polaris-pbs-01"].raw.startswith('{"1008.polaris-pbs-01"')
    assert "could not parse" in got["1008.polaris-pbs-01"].reason
    assert "no longer knows" in got["1010"].reason
    assert pbs.parse_pbsnodes_json((DATA / "pbs_pbsnodes.json").read_text()) == [Window(3, None)]


def test_torque_parsing_of_transcribed_and_recorded_qstat_f():
    """Transcribed `qstat -f` following the Torque guide (4-space attributes, tab continuation
    lines, exit_status -11 = walltime, 271 = qdel of a running job), and `qstat -f` recorded from
    Slurm's Torque wrapper on this machine."""
    jobs, garbage = torque.parse_qstat_full((DATA / "torque_qstat_f.txt").read_text())
    assert not garbage and len(jobs) == 8
    assert jobs["2001.torque-srv.example.org"]["Variable_List"].endswith(
        "PBS_O_SHELL=/bin/bash,PBS_O_WORKDIR=/scratch/bob/pf-torque-1")
    b = torque.TorqueBatch()
    ids = [f"200{i}.torque-srv.example.org" for i in range(1, 9)]
    got = _status_with_output(b, "qstat", (DATA / "torque_qstat_f.txt").read_text(), ids)
    assert [got[i].state for i in ids] == [R, Q, F, T, C, X, Q, M]
    assert got[ids[0]].nodes == ("n017", "n018")
    got = _status_with_output(b, "qstat", (DATA / "torque_qstat_f_slurm_wrapper.txt").read_text(),
                              ["85", "86", "2003"])
    assert states(got) == {"85": R, "86": Q, "2003": M}
    assert got["85"].nodes == ("node1", "node2", "node3", "node4")


def test_cobalt_parsing_of_transcribed_qstat():
    """Transcribed `qstat --header JobID:State:Location` (Cobalt's tabular output: header, a
    line of '=', rows); Cobalt cannot run here and keeps no history (gone = MISSING)."""
    ids = ["312", "313", "314", "315", "316", "317", "318"]
    got = _status_with_output(cobalt.CobaltBatch(), "qstat",
                              (DATA / "cobalt_qstat.txt").read_text(), ids)
    assert [got[i].state for i in ids] == [R, Q, Q, R, X, M, M]
    assert got["312"].nodes == ("3835-3837", "3840")
    assert "teleporting" in got["317"].raw and "Cobalt keeps no history" in got["318"].reason


def test_htcondor_parsing_of_transcribed_condor_q_and_history(tmp_path, monkeypatch):
    """Transcribed `condor_q -af:t ClusterId ProcId JobStatus ExitCode HoldReason RemoveReason`
    and the same from condor_history (JobStatus 1..7); HTCondor cannot run here."""
    bin_dir = _fake_bin(tmp_path, monkeypatch, {
        "condor_q": (DATA / "htcondor_q.txt").read_text(),
        "condor_history": (DATA / "htcondor_history.txt").read_text()})
    ids = [str(i) for i in range(4101, 4113)]
    got = htcondor.HTCondorBatch().status(ids)
    assert [got[i].state for i in ids] == [R, Q, Q, Q, R, F, X, C, T, X, M, M]
    assert "Exec format error" in got["4103"].reason
    assert got["4108"].reason == "via condor_rm (by user carol)"
    assert "could not parse" in got["4111"].reason and "4111\t0\t9" in got["4111"].raw
    calls = (bin_dir / "calls").read_text().splitlines()
    assert calls[0].startswith("condor_q 4101 4102") and calls[0].endswith(
        "-af:t ClusterId ProcId JobStatus ExitCode HoldReason RemoveReason")
    assert calls[1].startswith("condor_history -constraint ClusterId == 4106 || ")


def test_lsf_parsing_of_transcribed_bjobs_and_bslots():
    """Transcribed `bjobs -a -noheader -o "jobid stat exit_code exit_reason exec_host
    delimiter='|'"` with LSF's documented termination reasons, and `bslots`; LSF cannot run
    here."""
    ids = [str(i) for i in range(5001, 5011)]
    got = _status_with_output(lsf.LsfBatch(), "bjobs", (DATA / "lsf_bjobs.txt").read_text(), ids)
    assert [got[i].state for i in ids] == [R, Q, F, T, C, X, Q, M, M, M]
    assert got["5001"].nodes == ("batch3", "a01n01", "a01n02")
    assert got["5006"].reason == "exit 1" and "SLEEPING" in got["5009"].raw
    assert lsf.parse_bslots((DATA / "lsf_bslots.txt").read_text(), 42) == [
        Window(2, None), Window(4, pytest.approx(150.2)), Window(1, pytest.approx(12 + 5 / 60))]


def test_slurm_windows_end_where_a_pending_job_is_planned():
    """Recorded on the test cluster: a 2-node job runs for 30 min and a 4-node job waits for
    it; nodes 3-4 are idle (sinfo says 'plnd': planned) until the waiting job's expected start
    (squeue --start), 29 min 54 s after the recording; a held job has no start (N/A)."""
    from datetime import datetime
    now = datetime.fromisoformat("2026-11-24T06:39:26").timestamp()
    assert slurm.parse_windows((DATA / "slurm_sinfo_idle_planned.txt").read_text(),
                               (DATA / "slurm_squeue_start.txt").read_text(), now) == [
        Window(2, 29)]


def test_slurm_windows_per_partition_longest_first():
    """One window per distinct end, counting every node free at least that long; a partition's
    time limit caps it; a node whose planned job starts within the minute, a drained node and
    unreadable lines give nothing."""
    from datetime import datetime
    now = datetime.fromisoformat("2026-11-24T06:00:00").timestamp()
    sinfo = "\n".join(["n1|long|infinite|idle", "n2|long|infinite|idle", "n3|long|infinite|plnd",
                       "n4|long|infinite|idle", "n5|long|infinite|drain", "n1|short|30:00|idle",
                       "n6|short|30:00|idle", "n7|short|30:00|idle", "garbage", "n8|x|soon|idle"])
    planned = "\n".join(["2026-11-24T07:00:00|n[3-4]", "2026-11-24T06:10:00|n4",
                         "2026-11-24T06:00:30|n7", "not-a-time|n1", "N/A|(null)"])
    assert slurm.parse_windows(sinfo, planned, now) == [
        Window(2, None), Window(3, 60), Window(4, 10), Window(2, 30)]


def test_moab_showbf_windows():
    assert torque.parse_showbf((DATA / "moab_showbf.txt").read_text()) == [
        Window(16, None), Window(24, 150)]


@pytest.mark.parametrize("name,command", [
    ("pbs", "qstat"), ("torque", "qstat"), ("cobalt", "qstat"), ("htcondor", "condor_q"),
    ("lsf", "bjobs"), ("slurm", "squeue")])
def test_garbage_output_is_missing_with_the_raw_text(name, command, tmp_path, monkeypatch):
    garbage = (DATA / "garbage.txt").read_text()
    extra = {"condor_history": garbage, "sacct": garbage}
    _fake_bin(tmp_path, monkeypatch, {command: garbage, **extra})
    got = get(name).status(["1234"])["1234"]
    assert got.state == M and "could not parse" in got.reason, got
    assert "502 Bad Gateway" in got.raw


def test_ids_that_could_be_options_never_reach_a_command(tmp_path, monkeypatch):
    bin_dir = _fake_bin(tmp_path, monkeypatch, {c: "" for c in (
        "qstat", "bjobs", "condor_q", "condor_history", "squeue", "sacct")})
    for name in ("pbs", "torque", "cobalt", "htcondor", "lsf", "slurm"):
        got = get(name).status(["-f", "1;2", "$(id)"])
        assert all(s.state == M and "is not a" in s.reason for s in got.values()), got
        with pytest.raises(BatchError, match="is not a"):
            get(name).cancel("--all")
    assert not (bin_dir / "calls").exists()


def _fake_bin(tmp_path: Path, monkeypatch, outputs: dict[str, str], rc: int = 0,
              stdin: tuple[str, ...] = ()) -> Path:
    """Commands on PATH that print recorded output and log their argv to bin/calls (and, for
    the commands in ``stdin``, what they read to bin/<command>.stdin)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for cmd, text in outputs.items():
        (bin_dir / f"{cmd}.out").write_text(text)
        f = bin_dir / cmd
        keep = f"cat > {bin_dir}/{cmd}.stdin\n" if cmd in stdin else ""
        f.write_text(f'#!/bin/sh\necho "$(basename "$0") $*" >> {bin_dir}/calls\n{keep}'
                     f'cat {bin_dir}/{cmd}.out\nexit {rc}\n')
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.mark.parametrize("name,command,output,batch_id,argv,out", [
    ("pbs", "qsub", "1001.polaris-pbs-01\n", "1001.polaris-pbs-01", "qsub {w}/pilot.sh",
     "pilot.out"),
    ("cobalt", "qsub", "312\n", "312",
     "qsub -n 1 -t 30 -q debug -A CSC249 -O {w}/pf-sub --mode script {w}/pilot.sh",
     "pf-sub.output"),
    ("htcondor", "condor_submit", "4101.0 - 4101.0\n", "4101",
     "condor_submit -terse {w}/pilot.sub", "pilot.out"),
    ("lsf", "bsub", "Job <5001> is submitted to queue <batch>.\n", "5001", "bsub",
     "pilot-5001.out")])
def test_submit_commands_of_schedulers_that_cannot_run_here(name, command, output, batch_id,
                                                            argv, out, tmp_path, monkeypatch):
    """The submit command, the id read from its (documented) answer, and the files it names."""
    bin_dir = _fake_bin(tmp_path, monkeypatch, {command: output}, stdin=("bsub",))
    spec = PilotSpec(name="pf-sub", nodes=1, walltime_minutes=30, cores_per_node=8,
                     workdir=tmp_path / "w", head_argv=("/bin/true",),
                     queue=None if name == "htcondor" else "debug", project="CSC249")
    sub = get(name).submit(spec)
    w = spec.workdir
    assert (sub.batch_id, sub.stdout) == (batch_id, w / out)
    assert (bin_dir / "calls").read_text().rstrip() == argv.format(w=w)
    assert (w / "batch_id").read_text() == batch_id + "\n"
    assert os.access(sub.script, os.X_OK) and sub.script.read_text().startswith("#!/bin/bash")
    if name == "lsf":   # bsub < script
        assert (bin_dir / "bsub.stdin").read_text() == sub.script.read_text()


def test_submit_output_without_an_id_is_an_error(tmp_path, monkeypatch):
    _fake_bin(tmp_path, monkeypatch, {"qsub": "qsub: cannot connect to server\n"})
    with pytest.raises(BatchError, match="could not read a job id"):
        get("pbs").submit(PilotSpec(name="pf-x", nodes=1, walltime_minutes=5, cores_per_node=1,
                                    workdir=tmp_path / "w", head_argv=("/bin/true",)))


def _status_with_output(adapter, command: str, text: str, ids: list[str]) -> dict:
    mp = pytest.MonkeyPatch()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        try:
            _fake_bin(Path(d), mp, {command: text})
            return adapter.status(ids)
        finally:
            mp.undo()


# -- local: a process group on this machine -------------------------------------------------------
def local_spec(tmp_path: Path, *argv: str, name: str = "pf-local") -> PilotSpec:
    return PilotSpec(name=name, nodes=1, walltime_minutes=5, cores_per_node=1,
                     workdir=tmp_path / name, head_argv=argv)


def test_local_pilot_runs_to_finished(tmp_path):
    b = LocalBatch(state_dir=tmp_path / "state", grace=2)
    sub = b.submit(local_spec(tmp_path, "/bin/sleep", "1"))
    assert sub.batch_id.startswith("local-") and (sub.script.parent / "batch_id").read_text() \
        == sub.batch_id + "\n"
    assert b.status([sub.batch_id])[sub.batch_id].state == R
    wait_for(lambda: b.status([sub.batch_id])[sub.batch_id].state.final, 20, 0.1, "the end")
    assert b.status([sub.batch_id, "local-1"]) == {
        sub.batch_id: b.status([sub.batch_id])[sub.batch_id],
        "local-1": b.status(["local-1"])["local-1"]}
    assert b.status([sub.batch_id])[sub.batch_id].state == F
    assert b.status(["local-1"])["local-1"].state == M
    assert json.loads((sub.script.parent / "local.exit").read_text())["returncode"] == 0
    assert "pilotfish: pilot pf-local starts on" in sub.stdout.read_text()


def test_local_failing_head_is_failed(tmp_path):
    b = LocalBatch(state_dir=tmp_path / "state", grace=2)
    sub = b.submit(local_spec(tmp_path, "/bin/sh", "-c", "exit 3"))
    wait_for(lambda: b.status([sub.batch_id])[sub.batch_id].state.final, 20, 0.1, "the end")
    got = b.status([sub.batch_id])[sub.batch_id]
    assert got.state == X and got.reason == "exit 3"


def test_local_cancel_ends_the_whole_process_group(tmp_path):
    b = LocalBatch(state_dir=tmp_path / "state", grace=2)
    # the head leaves a child behind in its group, as agents would be
    sub = b.submit(local_spec(tmp_path, "/bin/sh", "-c", "sleep 300 & exec sleep 300"))
    pid = int(sub.batch_id.split("-")[1])
    wait_for(lambda: len(_group(pid)) == 2, 10, 0.05, "head and child")
    b.cancel(sub.batch_id)
    wait_for(lambda: b.status([sub.batch_id])[sub.batch_id].state.final, 20, 0.05, "the end")
    assert b.status([sub.batch_id])[sub.batch_id].state == C
    wait_for(lambda: not _group(pid), 10, 0.05, "the group to be gone")
    b.cancel(sub.batch_id)   # cancelling an ended pilot is a no-op
    with pytest.raises(BatchError, match="no local pilot"):
        b.cancel("local-1")


def test_local_sigterm_ignoring_head_is_killed_after_the_grace(tmp_path):
    b = LocalBatch(state_dir=tmp_path / "state", grace=1)
    sub = b.submit(local_spec(tmp_path, "/bin/sh", "-c", "trap '' TERM; sleep 300"))
    time.sleep(0.3)
    t0 = time.monotonic()
    b.cancel(sub.batch_id)
    wait_for(lambda: b.status([sub.batch_id])[sub.batch_id].state.final, 20, 0.05, "the end")
    assert 0.9 < time.monotonic() - t0 < 10
    assert b.status([sub.batch_id])[sub.batch_id].state == C


def test_local_pilot_survives_its_submitter(tmp_path):
    """`pilotfish pilot submit` returns while the pilot keeps running."""
    state = tmp_path / "state"
    code = ("import sys; from pathlib import Path; from pilotfish.pilot.batch import PilotSpec;"
            "from pilotfish.pilot.batch.local import LocalBatch;"
            f"s = LocalBatch(state_dir={str(state)!r}).submit(PilotSpec(name='pf-orphan', "
            f"nodes=1, walltime_minutes=5, cores_per_node=1, workdir=Path({str(tmp_path)!r}),"
            "head_argv=('/bin/sleep', '2'))); print(s.batch_id)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.strip()
    b = LocalBatch(state_dir=state)
    assert b.status([batch_id])[batch_id].state == R   # the submitter has exited
    wait_for(lambda: b.status([batch_id])[batch_id].state.final, 20, 0.1, "the end")
    assert b.status([batch_id])[batch_id].state == F


def test_local_walltime_ends_the_pilot_as_timeout(tmp_path):
    """The supervisor enforces the walltime like a batch system (0.02 min here) and gives the
    script PILOTFISH_END_TIME."""
    script = tmp_path / "pilot.sh"
    script.write_text('#!/bin/bash\necho "end=$PILOTFISH_END_TIME"\nexec sleep 300\n')
    script.chmod(0o755)
    t0 = time.monotonic()
    assert supervise([str(tmp_path), str(script), "0.02", "1"]) == 0
    assert time.monotonic() - t0 < 10
    ended = json.loads((tmp_path / "local.exit").read_text())
    assert ended["why"] == "timeout" and ended["returncode"] == -15
    assert (tmp_path / "pilot.out").read_text().startswith("end=")


def _group(pgid: int) -> list[int]:
    import psutil
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


# -- real Slurm ----------------------------------------------------------------------------------
@pytest.fixture
def slurm_ids():
    """Slurm job ids a test submitted; cancelled at teardown if still known to squeue."""
    ids: list[str] = []
    yield ids
    for jid in ids:
        if slurm_job_state(jid) is not None:
            scancel(jid)


def tiny(tmp_path: Path, name: str, *argv: str, **kw) -> PilotSpec:
    return PilotSpec(name=name, nodes=kw.pop("nodes", 1), walltime_minutes=2, cores_per_node=1,
                     workdir=tmp_path / name, head_argv=argv, **kw)


@pytest.mark.slow
def test_slurm_submit_status_cancel_for_real(slurm, tmp_path, slurm_ids):
    """One pilot runs /bin/sleep 3 to FINISHED, another is cancelled, a bad partition is
    refused with sbatch's own message, an unknown id is MISSING."""
    b = get("slurm")
    done = b.submit(tiny(tmp_path, "pf-slurm-done", "/bin/sleep", "3"))
    gone = b.submit(tiny(tmp_path, "pf-slurm-gone", "/bin/sleep", "60"))
    slurm_ids += [done.batch_id, gone.batch_id]
    assert (tmp_path / "pf-slurm-done" / "batch_id").read_text().strip() == done.batch_id
    seen: set = set()
    cancelled: list = []

    def ended():
        got = b.status([done.batch_id, gone.batch_id, "99999999"])
        assert got["99999999"].state == M
        seen.add(got[done.batch_id].state)
        if got[gone.batch_id].state == R and not cancelled:
            cancelled.append(b.cancel(gone.batch_id))
        return got[done.batch_id].state.final and got[gone.batch_id].state.final and got

    got = wait_for(ended, 60, 0.3, "both pilots to end")
    assert got[done.batch_id].state == F and got[done.batch_id].nodes
    assert got[gone.batch_id].state == C and cancelled
    assert R in seen, seen
    assert "pilotfish: pilot pf-slurm-done starts on" in done.stdout.read_text()
    # once slurmctld forgets a job, accounting (sacct, or sacct -c for jobcomp) still knows it
    more = wait_for(lambda: b._from_accounting([done.batch_id])[0], 10, 0.5, "its record")
    assert more[done.batch_id].state == F
    with pytest.raises(BatchError, match="invalid partition specified: no-such-partition"):
        b.submit(tiny(tmp_path, "pf-slurm-bad", "/bin/true", queue="no-such-partition"))


@pytest.mark.slow
def test_slurm_windows_are_the_idle_nodes(slurm):
    """The test cluster has one partition without a time limit: one window, minutes None, as
    many nodes as sinfo calls idle (other tests may hold nodes meanwhile, so retry)."""
    def consistent():
        idle = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N %t"],
                              capture_output=True, text=True, timeout=20).stdout.splitlines()
        n = len({line.split()[0] for line in idle if line.split()[1:] == ["idle"]})
        return get("slurm").windows() == ([Window(n, None)] if n else [])
    wait_for(consistent, 20, 0.5, "sinfo and windows() to agree")


@pytest.mark.slow
def test_slurm_windows_for_real_end_at_the_planned_start(slurm, slurm_ids):
    """A 2-node job of 30 min holds two nodes and a 4-node job waits for it: the other idle
    nodes make one window that ends when the waiting job is expected to start, not an endless
    one (the backfill scheduler, every 5 s here, plans the waiting job on all 4 nodes)."""
    def submit(nodes: int, minutes: int) -> str:
        jid = subprocess.run(["sbatch", "--parsable", "-N", str(nodes), "--exclusive", "-t",
                              str(minutes), "-o", "/dev/null", "--wrap", "sleep 600"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        slurm_ids.append(jid.strip().split(";")[0])
        return slurm_ids[-1]
    wait_for(lambda: len(get("slurm").windows()) == 1 and
             get("slurm").windows()[0].nodes == 4, 60, 0.5, "all 4 nodes idle")
    submit(2, 30)
    wait_for(lambda: slurm_job_state(slurm_ids[0]) == "RUNNING", 30, 0.2, "the 2-node job")
    submit(4, 30)
    got = wait_for(lambda: [w for w in get("slurm").windows() if w.minutes is not None], 30,
                   0.5, "the waiting job's planned start")
    assert [w.nodes for w in got] == [2] and 27 <= got[0].minutes <= 30, got
    assert all(w.minutes is not None for w in get("slurm").windows())


@pytest.mark.slow
def test_torque_adapter_on_slurms_torque_wrappers(slurm, tmp_path, slurm_ids):
    """qsub/qstat/qdel from slurm-wlm-torque (scripts/slurm_up installs them): a 2-node pilot
    runs to the end (its output where the command-line -o put it), another is cancelled."""
    require(bool(shutil.which("qsub")) and bool(shutil.which("qstat")) and
            "slurm" in Path(shutil.which("qsub")).read_text(errors="replace").lower(),
            "Slurm's Torque wrappers (apt-get install slurm-wlm-torque)")
    b = get("torque")
    done = b.submit(tiny(tmp_path, "pf-torque-done", "/bin/sleep", "2", nodes=2))
    gone = b.submit(tiny(tmp_path, "pf-torque-gone", "/bin/sleep", "60"))
    slurm_ids += [done.batch_id, gone.batch_id]

    cancelled: list = []

    def ended():
        got = b.status([done.batch_id, gone.batch_id])
        if got[gone.batch_id].state == R and not cancelled:
            cancelled.append(b.cancel(gone.batch_id))
        return got[done.batch_id].state.final and got[gone.batch_id].state.final and got

    got = wait_for(ended, 60, 0.3, "both pilots to end")
    assert got[done.batch_id].state == F and len(got[done.batch_id].nodes) == 2
    assert got[gone.batch_id].state == C
    assert "pilotfish: pilot pf-torque-done starts on" in done.stdout.read_text()
