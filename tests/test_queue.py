"""The ready queue: priority first, shapes that fit, sites, time left and budgets."""
from pilotfish.server.queue import ReadyQueue, Shape


def shape(cores=1, gpus=0, site=None, wall=None, nodes=1):
    return Shape(site, nodes, cores, gpus, wall)


def test_priority_then_age():
    """Higher priority first; equal priority oldest (lowest id) first."""
    q = ReadyQueue()
    for job, prio in [(1, 0), (2, 5), (3, 0), (4, 5)]:
        q.push(job, prio, shape())
    got = q.pick("s", 8, 0, None, cores=3, gpus=0, limit=10)
    assert [j for j, _ in got] == [2, 4, 1]
    assert len(q) == 1


def test_shapes_must_fit_agent_and_budget():
    """Jobs too big for the agent, for another site, too long or multi-node stay queued."""
    q = ReadyQueue()
    q.push(1, 0, shape(cores=16))
    q.push(2, 0, shape(gpus=1))
    q.push(3, 0, shape(site="other"))
    q.push(4, 0, shape(wall=3600))
    q.push(5, 0, shape(nodes=2))
    q.push(6, 0, shape(site="here", cores=2))
    got = q.pick("here", 8, 0, 600, cores=8, gpus=0, limit=10)
    assert [j for j, _ in got] == [6]
    assert len(q) == 5


def test_budget_limits_cores():
    """A budget of 3 cores takes one 2-core job and one 1-core job."""
    q = ReadyQueue()
    q.push(1, 1, shape(cores=2))
    q.push(2, 1, shape(cores=2))
    q.push(3, 0, shape(cores=1))
    got = q.pick(None, 8, 0, None, cores=3, gpus=0, limit=10)
    assert [j for j, _ in got] == [1, 3]


def test_lazy_removal():
    """Removed jobs are never handed out; re-added jobs are handed out once."""
    q = ReadyQueue()
    q.push(1, 0, shape())
    q.push(2, 0, shape())
    assert q.remove(1)
    q.push(2, 0, shape())
    got = q.pick(None, 4, 0, None, cores=4, gpus=0, limit=10)
    assert [j for j, _ in got] == [2]
    assert len(q) == 0 and not q.remove(2)


def test_slurm_time_left_parsing():
    """Agents read their time left from Slurm's %L: [days-]h:m:s, m:s, UNLIMITED."""
    from pilotfish.pilot.resources import parse_slurm_time
    assert parse_slurm_time("1-02:03:04\n") == 93784
    assert parse_slurm_time("02:03:04") == 7384
    assert parse_slurm_time("03:04") == 184
    assert parse_slurm_time("UNLIMITED") is None and parse_slurm_time("") is None


def test_gpu_detection_from_cuda_visible_devices(tmp_path):
    """CUDA_VISIBLE_DEVICES decides the GPUs when set; empty or -1 means none (more vendors:
    tests/test_gpus.py)."""
    from pilotfish.pilot.gpus import detect
    no_tools = lambda argv: ""  # noqa: E731
    assert detect({"CUDA_VISIBLE_DEVICES": "0,2"}, tmp_path, no_tools).ids == ("0", "2")
    assert detect({"CUDA_VISIBLE_DEVICES": ""}, tmp_path, no_tools).ids == ()
    assert detect({"CUDA_VISIBLE_DEVICES": "-1"}, tmp_path, no_tools).ids == ()
