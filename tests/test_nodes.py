"""Node discovery: Slurm hostlist expansion (golden cases after slurm_hostlist_create(3),
Slurm::Hostlist(3pm) and Slurm's hostlist.c), every batch-system source with files in tmp_path
and a plain dict for the environment, the precedence between sources, a battery of refused
inputs with their messages, and generated hostlists checked against independently built lists.
"""
from __future__ import annotations

import random
import re
import socket

import pytest

from pilotfish.errors import ValidationError
from pilotfish.pilot.nodes import MAX_HOSTS, discover, expand_hostlist

HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# ---------------------------------------------------------------- hostlist syntax

GOLDEN = [
    ("nid00010", ["nid00010"]),
    ("nid[00010-00012,00020]", ["nid00010", "nid00011", "nid00012", "nid00020"]),
    # The man page example.
    ("tux[0-5,12,20-25]", [f"tux{n}" for n in [0, 1, 2, 3, 4, 5, 12, 20, 21, 22, 23, 24, 25]]),
    # Padding is the width of the lower bound: none here, so 10 simply grows a digit ...
    ("node[8-10]", ["node8", "node9", "node10"]),
    # ... and two digits here.
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    # Several bracket groups: a cartesian product, the left-most group varying slowest.
    ("rack[1-2]n[01-03]", ["rack1n01", "rack1n02", "rack1n03", "rack2n01", "rack2n02", "rack2n03"]),
    ("r[1,3]c[2]s[7-8]", ["r1c2s7", "r1c2s8", "r3c2s7", "r3c2s8"]),
    # A suffix after the brackets.
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    # Commas inside brackets do not split items; plain names mix with bracket items.
    ("nid[1,3],login", ["nid1", "nid3", "login"]),
    ("a[1-2],b,c[3]", ["a1", "a2", "b", "c3"]),
    # Order is kept (not sorted), inside brackets too.
    ("zeta1,alpha1", ["zeta1", "alpha1"]),
    ("n[3,1-2]", ["n3", "n1", "n2"]),
    # Duplicates are dropped, keeping the first.
    ("n[1-3],n2,n[3-4]", ["n1", "n2", "n3", "n4"]),
    ("x,x,x", ["x"]),
    # The characters host names may use; surrounding white space is ignored.
    ("gpu-01.cluster_a", ["gpu-01.cluster_a"]),
    ("  cn[1-2]\n", ["cn1", "cn2"]),
    ("[1-2]x", ["1x", "2x"]),
]


@pytest.mark.parametrize("text,expected", GOLDEN)
def test_expand_golden(text, expected):
    assert expand_hostlist(text) == expected


def test_expand_at_the_limit_is_accepted():
    hosts = expand_hostlist(f"n[1-{MAX_HOSTS}]")
    assert len(hosts) == MAX_HOSTS and hosts[0] == "n1" and hosts[-1] == f"n{MAX_HOSTS}"


BAD = [
    ("", ["empty hostlist"]),
    ("   ", ["empty hostlist"]),
    ("a[1-3", ["'a[1-3'", "unbalanced brackets"]),
    ("a1-3]", ["'a1-3]'", "unbalanced brackets"]),
    ("a[1-2]],b", ["unbalanced brackets"]),
    ("a]1[", ["unbalanced brackets"]),
    ("a[1[2]]", ["'a[1[2]]'", "nested or unbalanced brackets"]),
    ("a,,b", ["'a,,b'", "empty item"]),
    ("a,", ["empty item"]),
    (",a", ["empty item"]),
    ("nid[]", ["'nid[]'", "empty brackets"]),
    ("nid[1,,3]", ["'nid[1,,3]'", "empty entry"]),
    ("nid[1,]", ["empty entry"]),
    ("nid[5-3]", ["'nid[5-3]'", "reversed range '5-3'"]),
    ("nid[10-9]", ["reversed range '10-9'"]),
    ("nid[010-009]", ["reversed range '010-009'"]),
    ("nid[a-c]", ["'nid[a-c]'", "'a-c' is not a number"]),
    ("nid[1-]", ["'1-' is not a number"]),
    ("nid[-3]", ["'-3' is not a number"]),
    ("nid[1-2-3]", ["'1-2-3' is not a number"]),
    ("nid[1 - 3]", ["'1 - 3' is not a number"]),
    ("nid[1x3]", ["'1x3' is not a number"]),
    ("a b", ["'a b'", "character ' ' is not allowed"]),
    ("host;rm", ["character ';' is not allowed"]),
    ("a/b", ["character '/' is not allowed"]),
    ("a\nb", ["character '\\n' is not allowed"]),
    ("nöd1", ["character 'ö' is not allowed"]),
    ("-a", ["'-a' must start with a letter or digit"]),
    ("x,.hidden", ["'.hidden' must start with a letter or digit"]),
    (f"n[1-{MAX_HOSTS + 1}]", [f"{MAX_HOSTS + 1:,} hosts", f"more than the {MAX_HOSTS:,}"]),
    ("r[1-1000]n[1-1000]", ["1,000,000 hosts", "more than"]),
    (f"a[1-{MAX_HOSTS}],b[1-2]", ["more than the"]),
    ("n[0-999999999999999999]", ["more than the"]),
]


@pytest.mark.parametrize("text,fragments", BAD)
def test_expand_refuses(text, fragments):
    with pytest.raises(ValidationError) as err:
        expand_hostlist(text)
    msg = str(err.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_long_input_is_cut_in_the_message():
    with pytest.raises(ValidationError) as err:
        expand_hostlist("n" * 5000 + "[3-1]")
    assert "reversed range" in str(err.value) and len(str(err.value)) < 300


# ---------------------------------------------------------------- generated hostlists

def _random_names(rng: random.Random) -> list[str]:
    prefixes = ["nid", "cn", "gpu-", "rack1n", "x1000c0s0b0n", "a.b_c"]
    names = {f"{rng.choice(prefixes)}{str(rng.randrange(0, 10_000)).zfill(rng.randint(0, 5))}"
             for _ in range(rng.randint(1, 40))}
    names |= {rng.choice(["login", "head", "mom"]) for _ in range(rng.randint(0, 2))}
    ordered = sorted(names)
    rng.shuffle(ordered)
    return ordered


def _random_ranges(rng: random.Random, width: int) -> tuple[str, list[str]]:
    """A bracket body of disjoint ranges and single numbers, and its numbers written out."""
    starts = sorted(rng.sample(range(0, 10 ** width // 2), rng.randint(1, 4)))
    rng.shuffle(starts)
    body, numbers = [], []
    for i, lo in enumerate(starts):
        hi = lo + rng.randint(0, 5)
        numbers += [str(n).zfill(width) for n in range(lo, hi + 1)]
        body.append(str(lo).zfill(width) if lo == hi else
                    f"{str(lo).zfill(width)}-{str(hi).zfill(width)}")
    return ",".join(body), numbers


def test_generated_plain_lists_round_trip():
    rng = random.Random(1234)
    for _ in range(300):
        names = _random_names(rng)
        assert expand_hostlist(",".join(names)) == names


def test_generated_bracket_forms_expand_as_built():
    rng = random.Random(4321)
    for _ in range(300):
        w1, w2 = rng.randint(3, 4), rng.randint(1, 3)
        body1, nums1 = _random_ranges(rng, w1)
        body2, nums2 = _random_ranges(rng, w2)
        # Ranges overlap only by accident of sampling; the expected lists drop repeats too.
        one = list(dict.fromkeys(f"nid{n}" for n in nums1))
        two = list(dict.fromkeys(f"r{a}n{b}.x" for a in nums1 for b in nums2))
        assert expand_hostlist(f"nid[{body1}]") == one
        assert expand_hostlist(f"r[{body1}]n[{body2}].x") == two
        both = expand_hostlist(f"nid[{body1}],r[{body1}]n[{body2}].x,login")
        assert both == one + two + ["login"]


def test_fuzzed_input_is_expanded_or_refused_never_crashes():
    rng = random.Random(99)
    alphabet = "ab01-9[],._ /"
    refused = accepted = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            hosts = expand_hostlist(text)
        except ValidationError as e:
            assert "\n" not in str(e)
            refused += 1
        else:
            assert hosts and len(set(hosts)) == len(hosts)
            assert all(HOST.fullmatch(h) for h in hosts), (text, hosts)
            accepted += 1
    assert refused and accepted


# ---------------------------------------------------------------- sources

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_explicit_hostlist():
    assert discover({}, "nid[1-2]") == (["nid1", "nid2"], "--nodes")


def test_explicit_file(tmp_path):
    path = _write(tmp_path / "hosts", ["# my nodes", "", "  b1  ", "a1", "b1", "c1"])
    assert discover({}, f"@{path}") == (["b1", "a1", "c1"], "--nodes")


def test_slurm():
    assert discover({"SLURM_JOB_NODELIST": "nid[00010-00011]"}) == (
        ["nid00010", "nid00011"], "SLURM_JOB_NODELIST")
    assert discover({"SLURM_NODELIST": "cn[7,9]"}) == (["cn7", "cn9"], "SLURM_NODELIST")
    assert discover({"SLURM_JOB_NODELIST": "new1", "SLURM_NODELIST": "old1"})[0] == ["new1"]


def test_pbs_nodefile_has_a_line_per_slot(tmp_path):
    path = _write(tmp_path / "pbs", ["r1i0n5", "r1i0n5", "r1i0n2", "r1i0n2", "r1i0n5", "r1i0n9"])
    assert discover({"PBS_NODEFILE": path}) == (["r1i0n5", "r1i0n2", "r1i0n9"], "PBS_NODEFILE")


def test_cobalt_nodefile(tmp_path):
    path = _write(tmp_path / "cobalt", ["nid00012", "nid00013"])
    assert discover({"COBALT_NODEFILE": path}) == (["nid00012", "nid00013"], "COBALT_NODEFILE")


def test_cobalt_partname_theta():
    assert discover({"COBALT_PARTNAME": "3835-3837,3840"}) == (
        ["nid03835", "nid03836", "nid03837", "nid03840"], "COBALT_PARTNAME")
    assert discover({"COBALT_PARTNAME": "7"}) == (["nid00007"], "COBALT_PARTNAME")
    assert discover({"COBALT_PARTNAME": "12,3-4,12"})[0] == ["nid00012", "nid00003", "nid00004"]


def test_lsf_hostfile_drops_the_launch_node(tmp_path):
    # Summit: the batch node first, then 42 slots on each compute node.
    path = _write(tmp_path / "lsf", ["batch3"] + ["a01n01"] * 42 + ["a01n02"] * 42)
    assert discover({"LSB_DJOB_HOSTFILE": path}) == (["a01n01", "a01n02"], "LSB_DJOB_HOSTFILE")


def test_lsf_hostfile_single_host_is_kept(tmp_path):
    path = _write(tmp_path / "lsf", ["only1"])
    assert discover({"LSB_DJOB_HOSTFILE": path}) == (["only1"], "LSB_DJOB_HOSTFILE")


def test_lsf_hostfile_first_host_with_more_slots_stays(tmp_path):
    # Plain LSF: the first line is a slot on the first execution host; only that line goes.
    path = _write(tmp_path / "lsf", ["hA", "hA", "hB"])
    assert discover({"LSB_DJOB_HOSTFILE": path})[0] == ["hA", "hB"]


def test_lsb_hosts():
    assert discover({"LSB_HOSTS": "batch1 h1 h1 h2 h2"}) == (["h1", "h2"], "LSB_HOSTS")
    assert discover({"LSB_HOSTS": "  solo  "}) == (["solo"], "LSB_HOSTS")


def test_no_batch_system_means_this_host():
    assert discover({}) == ([socket.gethostname()], "this host")
    assert discover({"HOME": "/home/x", "PATH": "/bin"})[1] == "this host"


def test_empty_variables_count_as_unset(tmp_path):
    path = _write(tmp_path / "pbs", ["p1"])
    assert discover({"SLURM_JOB_NODELIST": "", "SLURM_NODELIST": " ", "PBS_NODEFILE": path}) == (
        ["p1"], "PBS_NODEFILE")


def test_precedence(tmp_path):
    env = {
        "SLURM_JOB_NODELIST": "s1",
        "SLURM_NODELIST": "s2",
        "PBS_NODEFILE": _write(tmp_path / "pbs", ["p1"]),
        "COBALT_NODEFILE": _write(tmp_path / "cobalt", ["c1"]),
        "COBALT_PARTNAME": "5",
        "LSB_DJOB_HOSTFILE": _write(tmp_path / "lsf", ["batch", "l1"]),
        "LSB_HOSTS": "batch h1",
    }
    assert discover(env, "e1") == (["e1"], "--nodes")
    expected = [("s1", "SLURM_JOB_NODELIST"), ("s2", "SLURM_NODELIST"), ("p1", "PBS_NODEFILE"),
                ("c1", "COBALT_NODEFILE"), ("nid00005", "COBALT_PARTNAME"),
                ("l1", "LSB_DJOB_HOSTFILE"), ("h1", "LSB_HOSTS")]
    for (host, source), name in zip(expected, list(env)):
        assert discover(env) == ([host], source)
        del env[name]
    assert discover(env)[1] == "this host"


# ---------------------------------------------------------------- refused sources

def _refused(env, explicit=None) -> str:
    with pytest.raises(ValidationError) as err:
        discover(env, explicit)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    missing = str(tmp_path / "nope")
    for var in ("PBS_NODEFILE", "COBALT_NODEFILE", "LSB_DJOB_HOSTFILE"):
        msg = _refused({var: missing})
        assert var in msg and missing in msg and "cannot read" in msg and "No such file" in msg
        msg = _refused({var: str(tmp_path)})
        assert var in msg and str(tmp_path) in msg and "cannot read" in msg
    msg = _refused({}, f"@{missing}")
    assert f"--nodes @{missing}" in msg and "cannot read" in msg
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00junk\n")
    assert "cannot read" in _refused({"PBS_NODEFILE": str(binary)})


def test_empty_files(tmp_path):
    empty = _write(tmp_path / "empty", [])
    comments = _write(tmp_path / "comments", ["# nothing", "", "   "])
    for var in ("PBS_NODEFILE", "COBALT_NODEFILE", "LSB_DJOB_HOSTFILE"):
        for path in (empty, comments):
            msg = _refused({var: path})
            assert var in msg and path in msg and "lists no hosts" in msg
    assert "lists no hosts" in _refused({}, f"@{empty}")


def test_bad_host_lines(tmp_path):
    path = _write(tmp_path / "pbs", ["good1", "bad host;rm -rf"])
    msg = _refused({"PBS_NODEFILE": path})
    assert "PBS_NODEFILE" in msg and path in msg and "line 2" in msg and "'bad host;rm -rf'" in msg
    assert "is not a host name" in _refused({"LSB_HOSTS": "batch good -bad"})
    assert "LSB_HOSTS" in _refused({"LSB_HOSTS": "batch $(x)"})


def test_bad_hostlists_name_their_source():
    msg = _refused({"SLURM_JOB_NODELIST": "nid[5-3]"})
    assert msg.startswith("SLURM_JOB_NODELIST: ") and "reversed range '5-3'" in msg
    assert _refused({"SLURM_NODELIST": "a[1"}).startswith("SLURM_NODELIST: ")
    msg = _refused({}, "")
    assert msg.startswith("--nodes: ") and "empty hostlist" in msg
    assert "unbalanced" in _refused({"SLURM_JOB_NODELIST": "ok1"}, "a]")


def test_bad_cobalt_partname():
    msg = _refused({"COBALT_PARTNAME": "ANL-R00-R01-2048"})
    assert "COBALT_PARTNAME" in msg and "Theta nid numbers" in msg
    assert "reversed range '9-3'" in _refused({"COBALT_PARTNAME": "1,9-3"})
    assert "empty entry" in _refused({"COBALT_PARTNAME": "1,,2"})
    assert f"more than {MAX_HOSTS:,} hosts" in _refused({"COBALT_PARTNAME": f"1-{10 ** 15}"})


def test_host_limit_for_files_and_nid_lists(tmp_path):
    at_limit = _write(tmp_path / "full", [f"n{i}" for i in range(MAX_HOSTS)] + ["n0"])
    assert len(discover({"PBS_NODEFILE": at_limit})[0]) == MAX_HOSTS
    over = _write(tmp_path / "over", [f"n{i}" for i in range(MAX_HOSTS + 1)])
    assert f"more than {MAX_HOSTS:,} hosts" in _refused({"PBS_NODEFILE": over})
    assert len(discover({"COBALT_PARTNAME": f"0-{MAX_HOSTS - 1}"})[0]) == MAX_HOSTS
    assert "more than" in _refused({"COBALT_PARTNAME": f"0-{MAX_HOSTS}"})


def test_bad_local_hostname(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "bad name")
    assert "this host" in _refused({})
