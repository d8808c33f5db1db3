"""The autotune cache: where it lives, that small or interpreted problems are never timed."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from moetune.kernels import autotune


def test_cache_path_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "autotune.json"
    monkeypatch.delenv("MOETUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "moetune" / "autotune.json"


def test_small_or_cpu_problems_take_the_first_candidate_without_timing():
    launched = []
    candidates = [{"BLOCK_M": 32}, {"BLOCK_M": 64}]
    pick = autotune.pick("k", (1,), candidates, launched.append, "cpu", num_rows=10**6)
    assert pick == candidates[0] and launched == []
    assert autotune.pick("k", (1,), candidates, launched.append, "cpu", num_rows=10) == candidates[0]


def test_cache_path_expands_a_home_tilde(monkeypatch, tmp_path):
    """Docker's ENV and os.environ do not expand `~`: the cache must not land in a directory named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOETUNE_CACHE_DIR", "~/cache")
    assert autotune.cache_path() == tmp_path / "cache" / "autotune.json"
    monkeypatch.delenv("MOETUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert autotune.cache_path() == tmp_path / "xdg" / "moetune" / "autotune.json"


def test_save_is_atomic_and_readable(monkeypatch, tmp_path):
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", None)
    mask = os.umask(0o022)
    try:
        autotune._save({"gpu|triton|k|(1,)": {"BLOCK_M": 64}})
    finally:
        os.umask(mask)
    assert json.loads((tmp_path / "autotune.json").read_text()) == {"gpu|triton|k|(1,)": {"BLOCK_M": 64}}
    assert [p.name for p in tmp_path.iterdir()] == ["autotune.json"]  # no temp file left behind
    # not NamedTemporaryFile's 0600: a new file as the umask makes files, readable by the users sharing it
    assert (tmp_path / "autotune.json").stat().st_mode & 0o777 == 0o644
    (tmp_path / "autotune.json").chmod(0o664)
    autotune._save({"gpu|triton|k|(2,)": {"BLOCK_M": 32}})
    assert (tmp_path / "autotune.json").stat().st_mode & 0o777 == 0o664  # a cache's own mode is kept


def test_a_save_merges_what_another_process_wrote_since_this_one_read(monkeypatch, tmp_path):
    """Ranks of one job (or two jobs) share the cache: each save re-reads the file under a lock, so no process
    drops the others' picks."""
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", None)
    path = tmp_path / "autotune.json"
    path.write_text(json.dumps({"b1": {"BLOCK_M": 16}}))
    assert autotune._load() == {"b1": {"BLOCK_M": 16}}  # this process read the file
    path.write_text(json.dumps({"b1": {"BLOCK_M": 16}, "a1": {"BLOCK_M": 32}}))  # another process added a1
    autotune._save({"b2": {"BLOCK_M": 64}})
    expected = {"a1": {"BLOCK_M": 32}, "b1": {"BLOCK_M": 16}, "b2": {"BLOCK_M": 64}}
    assert json.loads(path.read_text()) == expected
    assert autotune._load() == expected


def test_a_pick_another_process_tuned_meanwhile_is_read_not_tuned_again(monkeypatch, tmp_path):
    launch, timed = _fake_gpu(monkeypatch, tmp_path, {"first": [1.0], "second": [0.5]})
    candidates = [{"name": "first"}, {"name": "second"}]
    assert autotune._load() == {}  # read before the other process wrote
    key = f"fake GPU|triton {__import__('triton').__version__}|k|('meanwhile',)|"
    digest = __import__("hashlib").sha1(json.dumps(candidates, sort_keys=True).encode()).hexdigest()[:8]
    (tmp_path / "autotune.json").write_text(json.dumps({key + digest: {"name": "second"}}))
    assert autotune.pick("k", ("meanwhile",), candidates, launch, "cuda:0", num_rows=10**6) == {"name": "second"}
    assert timed == []


@pytest.mark.parametrize("content", ["[]", "null", '"text"', "7", '{"truncated": ', "\udcff"])
def test_a_damaged_cache_file_is_tuned_over_and_rewritten(monkeypatch, tmp_path, content):
    launch, timed = _fake_gpu(monkeypatch, tmp_path, {"first": [1.0, 1.0, 1.0, 1.0], "second": [0.5, 0.5, 0.5, 0.5]})
    (tmp_path / "autotune.json").write_text(content, errors="surrogateescape")
    candidates = [{"name": "first"}, {"name": "second"}]
    assert autotune.pick("k", ("damaged",), candidates, launch, "cuda:0", num_rows=10**6) == {"name": "second"}
    assert list(json.loads((tmp_path / "autotune.json").read_text()).values()) == [{"name": "second"}]


def test_a_cached_entry_that_is_not_among_the_candidates_is_tuned_again(monkeypatch, tmp_path):
    """An entry edited by hand or left by a bug must not reach a kernel as its config."""
    launch, timed = _fake_gpu(monkeypatch, tmp_path, {"first": [1.0, 1.0, 1.0, 1.0], "second": [0.5, 0.5, 0.5, 0.5]})
    candidates = [{"name": "first", "shape": (1, 2)}, {"name": "second", "shape": (3, 4)}]
    key = f"fake GPU|triton {__import__('triton').__version__}|k|('stale',)|"
    digest = __import__("hashlib").sha1(json.dumps(candidates, sort_keys=True).encode()).hexdigest()[:8]
    (tmp_path / "autotune.json").write_text(json.dumps({key + digest: {"name": "gone"}}))
    picked = autotune.pick("k", ("stale",), candidates, launch, "cuda:0", num_rows=10**6)
    assert picked is candidates[1] and timed
    # a good entry comes back as the candidate itself (its tuple, not JSON's list)
    monkeypatch.setattr(autotune, "_memory", None)
    monkeypatch.setattr(autotune, "_picked", {})
    timed.clear()
    assert autotune.pick("k", ("stale",), candidates, launch, "cuda:0", num_rows=10**6) is candidates[1]
    assert timed == []


def test_an_unreadable_cache_is_left_as_it_is_and_tuning_goes_on_in_memory(monkeypatch, tmp_path, capsys):
    launch, _ = _fake_gpu(monkeypatch, tmp_path, {"first": [1.0, 1.0, 1.0, 1.0], "second": [0.5, 0.5, 0.5, 0.5]})
    (tmp_path / "autotune.json").mkdir()  # read_text raises IsADirectoryError, as an unreadable file raises
    candidates = [{"name": "first"}, {"name": "second"}]
    assert autotune.pick("k", ("unreadable",), candidates, launch, "cuda:0", num_rows=10**6) == {"name": "second"}
    err = capsys.readouterr().err
    assert err.count("cannot read the autotune cache") == 1 and "left as it is" in err
    assert (tmp_path / "autotune.json").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["autotune.json"]


def test_a_failed_write_leaves_no_half_written_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", None)

    def full_disk(obj, f, **kwargs):
        f.write("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(autotune.json, "dump", full_disk)
    autotune._save({"k": {"BLOCK_M": 64}})
    assert list(tmp_path.iterdir()) == []
    assert "could not write the autotune cache" in capsys.readouterr().err


def test_a_near_tie_keeps_the_favourite_and_a_clear_win_replaces_it():
    from moetune.kernels.autotune import MARGIN, _choose

    favourite, other = {"name": "favourite"}, {"name": "other"}
    assert _choose([(1.0, favourite), (1.0 / (1 + MARGIN / 2), other)]) is favourite
    assert _choose([(1.0, favourite), (0.9, other)]) is other
    assert _choose([(0.8, favourite), (1.0, other)]) is favourite
    # a cost the GPU timing does not see (a launch's host time) counts for the first: 0.1 ms faster is not enough
    assert _choose([(1.0, favourite), (0.9, other)], first_bonus_ms=0.15) is favourite
    assert _choose([(1.0, favourite), (0.8, other)], first_bonus_ms=0.15) is other


def test_host_time_of_a_config_counts_on_top_of_its_gpu_time():
    from moetune.kernels.autotune import _choose
    from moetune.kernels.grouped_gemm import TMA_HOST_MS, _tma_host_ms

    pointers, tma = {"BLOCK_M": 64}, {"BLOCK_M": 64, "TMA_B": True}
    tma_both = {"BLOCK_M": 64, "TMA_A": True, "TMA_B": True}
    assert (_tma_host_ms(pointers), _tma_host_ms(tma), _tma_host_ms(tma_both)) == (0, TMA_HOST_MS, 2 * TMA_HOST_MS)
    # 4K-like: TMA saves less GPU time than its descriptors cost the host; 16K-like: it saves more
    assert _choose([(0.40, pointers), (0.39, tma), (0.37, tma_both)], host_ms=_tma_host_ms) is pointers
    assert _choose([(1.40, pointers), (1.30, tma), (1.10, tma_both)], host_ms=_tma_host_ms) is tma_both
    assert _choose([(1.00, pointers), (0.80, tma), (0.81, tma_both)], host_ms=_tma_host_ms) is tma


def test_no_fitting_candidate_is_a_clear_error():
    from moetune.kernels.autotune import _choose

    with pytest.raises(RuntimeError, match="no candidate config fits"):
        _choose([])


def test_a_failing_tma_persistent_or_gluon_candidate_is_skipped_and_other_failures_raise(monkeypatch, tmp_path,
                                                                                         capsys):
    """TMA, persistent and Gluon candidates depend on the Triton version: one that fails to compile drops out of
    tuning."""
    import triton.testing

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tune as on a GPU, with fakes for the GPU parts
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", None)
    monkeypatch.setattr(autotune, "_gpu_name", lambda index: "fake GPU")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn() or 1.0)
    monkeypatch.setattr(autotune, "_on_gpu", lambda index: contextlib.nullcontext())

    def launch(config):
        if config.get("TMA_B") or config.get("PERSISTENT") or config.get("GLUON") or config.get("broken"):
            raise RuntimeError("PassManager::run failed")

    candidates = [{"BLOCK_M": 64}, {"BLOCK_M": 64, "TMA_B": True}, {"BLOCK_M": 64, "PERSISTENT": 1},
                  {"BLOCK_M": 128, "GLUON": True}]
    assert autotune.pick("k", ("tma-skip",), candidates, launch, "cuda:0", num_rows=10**6) == candidates[0]
    err = capsys.readouterr().err
    assert "skipping config {'BLOCK_M': 64, 'TMA_B': True}" in err and "'PERSISTENT': 1}" in err
    assert "'GLUON': True}" in err
    with pytest.raises(RuntimeError, match="PassManager"):
        autotune.pick("k", ("tma-raise",), [{"BLOCK_M": 64}, {"broken": True}], launch, "cuda:0", num_rows=10**6)


def test_a_gpu_fault_in_a_tma_candidate_is_not_skipped(monkeypatch, tmp_path):
    """A bad memory access leaves the CUDA context unusable: tuning must stop there, not time the next config."""
    import triton.testing

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", None)
    monkeypatch.setattr(autotune, "_gpu_name", lambda index: "fake GPU")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn() or 1.0)
    monkeypatch.setattr(autotune, "_on_gpu", lambda index: contextlib.nullcontext())

    def launch(config):
        if config.get("TMA_B"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    candidates = [{"BLOCK_M": 64}, {"BLOCK_M": 64, "TMA_B": True}]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        autotune.pick("k", ("tma-fault",), candidates, launch, "cuda:0", num_rows=10**6)


def _fake_gpu(monkeypatch, tmp_path, times: dict[str, list[float]]):
    """Tune as on a GPU with do_bench replaced: each call of config `name` takes the next of times[name] (ms)."""
    import triton.testing

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MOETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", None)
    monkeypatch.setattr(autotune, "_gpu_name", lambda index: "fake GPU")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn())
    monkeypatch.setattr(autotune, "_picked", {})
    monkeypatch.setattr(autotune, "_on_gpu", lambda index: contextlib.nullcontext())
    timed = []

    def launch(config):
        timed.append(config["name"])
        return times[config["name"]].pop(0)

    return launch, timed


def test_a_config_that_was_fast_once_is_not_picked_over_steadier_ones(monkeypatch, tmp_path):
    """The first pass gives each config one window; the close contenders are timed again in alternating rounds and
    judged by their median, so one lucky window (a clock boost, an idle neighbour) does not decide the pick."""
    launch, timed = _fake_gpu(monkeypatch, tmp_path, {
        "first": [1.00, 1.00, 1.00, 1.00],
        "lucky": [0.80, 0.99, 0.98, 0.99],     # fast in the first pass only: not better than the first
        "steady": [0.85, 0.84, 0.85, 0.86],    # truly faster
        "slow": [1.50],                        # out of the running after the first pass: never timed again
    })
    candidates = [{"name": name} for name in ("first", "lucky", "slow", "steady")]
    assert autotune.pick("k", ("rounds",), candidates, launch, "cuda:0", num_rows=10**6) == {"name": "steady"}
    assert timed.count("slow") == 1
    assert [timed.count(name) for name in ("first", "lucky", "steady")] == [1 + autotune.ROUNDS] * 3
    # the rounds alternate: no config is timed twice in a row
    rounds = timed[len(candidates):]
    assert all(a != b for a, b in zip(rounds, rounds[1:]))


def test_rounds_keep_the_favourite_when_its_rival_was_lucky(monkeypatch, tmp_path):
    launch, _ = _fake_gpu(monkeypatch, tmp_path, {
        "first": [1.00, 1.01, 0.99, 1.00],
        "lucky": [0.85, 1.00, 1.01, 1.00],
    })
    candidates = [{"name": "first"}, {"name": "lucky"}]
    assert autotune.pick("k", ("favourite",), candidates, launch, "cuda:0", num_rows=10**6) == {"name": "first"}


def test_a_clear_first_pass_winner_is_not_timed_again(monkeypatch, tmp_path):
    launch, timed = _fake_gpu(monkeypatch, tmp_path, {"first": [0.5], "second": [1.0], "third": [0.9]})
    candidates = [{"name": name} for name in ("first", "second", "third")]
    assert autotune.pick("k", ("clear",), candidates, launch, "cuda:0", num_rows=10**6) == {"name": "first"}
    assert timed == ["first", "second", "third"]


def test_finalists_are_ranked_with_the_host_time_of_each_config(monkeypatch, tmp_path):
    """A config whose GPU time is close but whose host time is not (TMA descriptors at 4K) does not take a
    finalist's place."""
    from moetune.kernels.autotune import _retimed_finalists

    timings = [(1.0, {"name": "first"}), (0.95, {"name": "tma"}), (0.97, {"name": "pointers"})]
    calls = []

    def launch(config):
        calls.append(config["name"])
        return 1.0

    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: fn())
    monkeypatch.setattr(autotune, "FINALISTS", 1)
    finalists = _retimed_finalists(timings, launch, host_ms=lambda config: 0.3 if config["name"] == "tma" else 0.0)
    assert [config["name"] for _, config in finalists] == ["first", "pointers"]
    assert "tma" not in calls


def test_tuning_runs_with_the_operands_gpu_current(monkeypatch, tmp_path):
    """do_bench times on the current GPU's stream: tuning a launch for cuda:1 makes GPU 1 current meanwhile."""
    launch, timed = _fake_gpu(monkeypatch, tmp_path, {"first": [1.0], "second": [2.0]})
    current, seen = [0], []

    @contextlib.contextmanager
    def on_gpu(index):
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(autotune, "_on_gpu", on_gpu)
    candidates = [{"name": "first"}, {"name": "second"}]
    picked = autotune.pick("k", ("gpu 1",), candidates, lambda config: seen.append(current[0]) or launch(config),
                           "cuda:1", num_rows=10**6)
    assert picked == {"name": "first"} and timed == ["first", "second"]
    assert seen == [1, 1] and current[0] == 0
