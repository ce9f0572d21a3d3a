"""Extraction under torchrun (gloo on CPU): ranks share one cache's fixed row blocks, and the
cache is bitwise the single-process one, also after a rank is killed and the run resumed with
another number of processes. Real processes, real torch.distributed, real photos."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from cnncodes.extractor.journal import Journal

from cnncodes import extractor

from .conftest import CALTECH, needs_shared

pytestmark = [needs_shared, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--runtime", "torch", "-b", "4", "-l", "stage3", "-l", "penultimate"]


def manifest(tmp_path: Path, n: int, broken=()) -> Path:
    """A CSV of ``n`` real Caltech photos (absolute paths, nothing copied) with broken files at
    the positions ``broken`` (spread over blocks, so over ranks)."""
    photos = sorted(CALTECH.glob("train/*/*"))[:n]
    rows = [(str(p), p.parent.name) for p in photos]
    for k, pos in enumerate(broken):
        bad = tmp_path / f"broken{k}.jpg"
        bad.write_bytes(b"\xff\xd8 not a jpeg")
        rows.insert(pos, (str(bad), "Faces"))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    return csv


def torchrun(n: int, *args, wait=True, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "cnncodes", "extract", *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun stalled")
    return proc.returncode, out, err


def assert_same_cache(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert sorted(fa["codes"]) == sorted(fb["codes"])
        for name in fa["codes"]:
            x, y = fa["codes"][name][()], fb["codes"][name][()]
            assert x.tobytes() == y.tobytes(), name  # bitwise
        for col in ("status", "error", "sha256", "path"):
            assert (fa["images"][col][()] == fb["images"][col][()]).all(), col
        assert fa.attrs["complete"] and fb.attrs["complete"]
    assert not Journal(b).dir.exists() and not b.with_name(b.name + ".work").exists()


@pytest.fixture(scope="module")
def photos_csv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    csv = manifest(tmp, 40, broken=(1, 9, 22))
    ref = tmp / "one.h5"
    extractor.extract(csv, ref, layers=["stage3", "penultimate"], batch_size=4, runtime="torch")
    return csv, ref


def test_two_and_three_ranks_write_the_single_process_cache(photos_csv, tmp_path):
    csv, ref = photos_csv
    for n in (2, 3):
        out = tmp_path / f"ranks{n}.h5"
        rc, stdout, err = torchrun(n, csv, "--out", out, *ARGS, "--json")
        assert rc == 0, err[-3000:]
        r = json.loads(stdout)  # rank 0 alone prints, and its summary counts every rank's rows
        assert r["processed"] == r["images"] == 43 and r["failed"] == 3 and r["complete"]
        assert {f["path"].rsplit("/", 1)[-1] for f in r["failures"]} == {"broken0.jpg", "broken1.jpg",
                                                                        "broken2.jpg"}
        assert_same_cache(ref, out)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (read from the workers' environments)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(proc.name)
    return None


def test_kill_9_of_one_rank_then_resume_with_another_world_size(tmp_path):
    csv = manifest(tmp_path, 160)
    ref = tmp_path / "one.h5"
    extractor.extract(csv, ref, layers=["stage3", "penultimate"], batch_size=4, runtime="torch")
    out = tmp_path / "ddp.h5"
    proc = torchrun(2, csv, "--out", out, *ARGS, wait=False)
    journal, victim = Journal(out), None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(journal.shards()) >= 6:
                victim = _rank_pid(proc.pid, 1)
                if victim:
                    os.kill(victim, signal.SIGKILL)
                    break
            time.sleep(0.05)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert victim is not None, "the kill should land while the ranks extract"
    assert proc.returncode != 0
    saved = journal.row_count()[0]
    if out.exists():
        with h5py.File(out, "r") as f:
            saved += int((f["images/status"][()] != 0).sum())
            assert not f.attrs["complete"]
    assert 0 < saved < 160
    rc, stdout, err = torchrun(3, csv, "--out", out, *ARGS, "--json")
    assert rc == 0, err[-3000:]
    r = json.loads(stdout)
    assert r["state"] == "resumed" and r["processed"] == 160 - saved  # only the missing rows
    assert_same_cache(ref, out)


def test_layers_added_under_torchrun(photos_csv, tmp_path):
    csv, ref = photos_csv
    out = tmp_path / "grow.h5"
    extractor.extract(csv, out, layers=["penultimate"], batch_size=4, runtime="torch")
    rc, stdout, err = torchrun(2, csv, "--out", out, *ARGS, "--json")
    assert rc == 0, err[-3000:]
    assert json.loads(stdout)["state"] == "layers added"
    assert_same_cache(ref, out)
    assert not out.with_name(out.name + ".adding.h5").exists()


@pytest.mark.parametrize("pattern", [False, True])
def test_tar_shards_under_torchrun(tmp_path, pattern):
    from .test_shards import write_shards
    write_shards(sorted(CALTECH.glob("train/*/*"))[:30], tmp_path / "shards", per_shard=7)
    data = tmp_path / "shards"
    if pattern:
        data = str(data / "train-{000000..000003}.tar")
    one = tmp_path / "one.h5"
    extractor.extract(data, one, layers=["stage3", "penultimate"], batch_size=4, runtime="torch")
    rc, stdout, err = torchrun(2, data, "--out", tmp_path / "two.h5", *ARGS, "--json")
    assert rc == 0, err[-3000:]
    assert json.loads(stdout)["images"] == (28 if pattern else 30)
    assert_same_cache(one, tmp_path / "two.h5")


def test_rank_0_counts_the_other_ranks_rows_from_their_shards(tmp_path):
    from cnncodes.extractor.background import OtherRanks

    class Bar:
        n = 0

        def update(self, n, failed):
            self.n += n

    journal = Journal(tmp_path / "c.h5")
    journal.dir.mkdir()
    bar = Bar()
    with OtherRanks(journal, {4: 4, 12: 3}, bar, active=True) as watch:
        (journal.dir / "rows-000000000004-000000000007.npz").write_bytes(b"")
        (journal.dir / "rows-000000000000-000000000003.npz").write_bytes(b"")  # rank 0's own
        time.sleep(1.2)
        assert bar.n == 4
        (journal.dir / "rows-000000000012-000000000015.npz").write_bytes(b"")
        time.sleep(1.2)
    assert bar.n == 7 and not watch.blocks


def test_a_rank_that_dies_stops_the_other_with_a_message(tmp_path):
    """Without torchrun's agent (ranks started by hand, as on some clusters), the rank left
    alone stops at its next collective with one line instead of waiting for ever."""
    csv = manifest(tmp_path, 60)
    out = tmp_path / "alone.h5"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CNNCODES_DIST_TIMEOUT": "60"}
        cmd = [sys.executable, "-m", "cnncodes", "extract", str(csv), "--out", str(out), *ARGS]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not Journal(out).shards():
            time.sleep(0.05)
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1
    assert "another rank stopped" in err and "Traceback" not in err, err[-2000:]
    # what was finished is kept: the next run (one process) resumes and completes
    r = extractor.extract(csv, out, layers=["stage3", "penultimate"], batch_size=4, runtime="torch")
    assert r.complete and r.processed < 60
