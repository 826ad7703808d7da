"""Stage 1 streamed from webdataset shards (minigpt4_lite/stream.py): mixing by ratio, decoding in
DataLoader workers, bad data, flat memory over many shards, and two processes through torchrun
that read different samples, train one projection and resume at the right step."""

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest
import torch
from stream_worker import tiny_model, write_shards

from minigpt4_lite.errors import ConfigError, DataError
from minigpt4_lite.stream import (
    PAPER_RATIOS,
    ShardStream,
    StreamConfig,
    derive_seed,
    mixed_samples,
    parse_mix,
)
from minigpt4_lite.train import TrainConfig

WORKER = os.path.join(os.path.dirname(__file__), "stream_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
           PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two sources as the paper mixes them: 24 "laion" shards and 8 "ccsbu" ones, 4 pairs each."""
    folder = tmp_path_factory.mktemp("shards")
    return folder, {"laion": (write_shards(folder, "laion", 24, 4), PAPER_RATIOS["laion"]),
                    "ccsbu": (write_shards(folder, "ccsbu", 8, 4, seed=1), PAPER_RATIOS["ccsbu"])}


@pytest.fixture()
def model(llama_dir):
    return tiny_model(llama_dir)


def _batches(stream, model, n, **kw):
    it = stream.batches(model, TrainConfig(batch_size=3, steps=10, warmup_steps=1), **kw)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


# --- configuration --------------------------------------------------------------------------------
def test_mix_specs_parse_as_the_command_line_writes_them():
    assert parse_mix(["laion=laion/{00000..01000}.tar:115", "ccsbu=cc_sbu/{0..9}.tar:14"]) == {
        "laion": ("laion/{00000..01000}.tar", 115.0), "ccsbu": ("cc_sbu/{0..9}.tar", 14.0)}
    # no name, no ratio, urls with colons of their own
    assert parse_mix(["s3://bucket/a-{0..3}.tar", "web=https://host/b.tar?x=1:2.5"]) == {
        "source0": ("s3://bucket/a-{0..3}.tar", 1.0), "web": ("https://host/b.tar?x=1", 2.5)}


@pytest.mark.parametrize("kw,message", [
    (dict(mix={"laion": ("a.tar", 0)}), "source 'laion' needs shard urls and a ratio > 0"),
    (dict(mix={"laion": ([], 1)}), "source 'laion' needs shard urls"),
    (dict(mix="a.tar", workers=-1), "workers must be a whole number >= 0, got -1"),
    (dict(mix="a.tar", shuffle_buffer=0), "shuffle_buffer must be a whole number >= 1"),
])
def test_invalid_stream_config_is_one_clear_sentence(kw, message):
    with pytest.raises(ConfigError, match=message):
        StreamConfig(**kw)


def test_missing_shard_files_are_named_before_training(shards, model):
    folder, mix = shards
    with pytest.raises(DataError, match=r"Source 'laion': 2 of 26 shard file\(s\) do not exist, "
                                        r"e\.g\. .*laion-00024\.tar"):
        ShardStream(StreamConfig({"laion": (f"{folder}/laion-{{00000..00025}}.tar", 1)}))
    stage2 = TrainConfig(stage=2, steps=400, warmup_steps=200)
    with pytest.raises(ConfigError, match="stage-1 image-caption pairs"):
        next(ShardStream(StreamConfig(mix)).batches(model, stage2))


def test_seeds_are_stable_and_distinct():
    assert derive_seed(42, 0, 0, 0) == derive_seed(42, 0, 0, 0)
    seeds = {derive_seed(42, r, w, s) for r in range(4) for w in range(4) for s in (0, 1, 5000)}
    assert len(seeds) == 48
    assert derive_seed(42, 0, 0, 0) == 2367761311238893882  # the same on every machine


def _scale_doc_commands() -> list[tuple[str, list[str]]]:
    """docs/scale.md's commands: (launcher, the arguments after `minigpt4_lite`), launcher options
    checked by torchrun's and Accelerate's own parsers."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    text = open(os.path.join(ROOT, "docs", "scale.md")).read()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            argv = shlex.split(line)
            if argv[0] == "torchrun":
                launch = get_args_parser().parse_args(argv[1:])
            elif argv[:2] == ["accelerate", "launch"]:
                launch = launch_command_parser().parse_args(argv[2:])
            else:
                assert argv[:3] == ["python", "-m", "minigpt4_lite"], argv
                commands.append(("python", argv[3:]))
                continue
            assert launch.module and launch.training_script == "minigpt4_lite", argv
            commands.append((argv[0], launch.training_script_args))
    return commands


def test_the_scale_guide_launches_parse_with_torchrun_and_accelerate():
    commands = _scale_doc_commands()
    assert [launcher for launcher, _ in commands] == ["python", "torchrun", "accelerate",
                                                      "torchrun"]
    for _, args in commands:
        mixes = [a.split("=", 1)[1] for a in args if a.startswith("--mix=")] + [
            args[i + 1] for i, a in enumerate(args) if a == "--mix"]
        assert [r for _, r in parse_mix(mixes).values()] == [115.0, 14.0]


def test_the_scale_guide_commands_parse_with_the_command_line():
    from minigpt4_lite.cli import build_parser

    for _, args in _scale_doc_commands():
        parsed = build_parser().parse_args(args)
        assert parse_mix(parsed.mix) == {
            "laion": ("/data/laion/laion_dataset/{00000..10488}.tar", 115.0),
            "ccsbu": ("/data/cc_sbu/cc_sbu_dataset/{00000..01255}.tar", 14.0)}
        assert parsed.recipe == "paper" and parsed.stage == 1


# --- mixing ---------------------------------------------------------------------------------------
def test_sources_are_mixed_by_sample_ratio(shards):
    """LAION : CC+SBU = 115 : 14 (paper): over 2,000 samples the LAION share is 115/129 = 0.891
    within 0.025 (3.5 standard deviations of a binomial share over 2,000 draws: 0.007)."""
    _, mix = shards
    raw = mixed_samples(StreamConfig(mix, shuffle_buffer=16), seed=7)
    drawn = [next(raw) for _ in range(2000)]
    share = sum(r["__source__"] == "laion" for r in drawn) / len(drawn)
    assert abs(share - 115 / 129) < 0.025, share
    for r in drawn:  # each sample comes from its own source's shards
        assert os.path.basename(r["__url__"]).startswith(r["__source__"])
    # resampling: every shard of both sources is read, again and again
    assert len({r["__url__"] for r in drawn}) == 32


def test_readers_read_disjoint_shards(shards):
    _, mix = shards
    cfg = StreamConfig(mix, shuffle_buffer=4)
    reads = [{r["__url__"] for r, _ in zip(mixed_samples(cfg, seed=k, reader=k, readers=4),
                                          range(300))} for k in range(4)]
    assert all(reads)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not reads[a] & reads[b]  # 4 readers, each its own quarter of the shards
    assert set().union(*reads) == set(cfg.sources["laion"][0]) | set(cfg.sources["ccsbu"][0])


# --- decoding in workers --------------------------------------------------------------------------
def test_workers_decode_batches_that_are_a_function_of_seed_rank_and_step(shards, model):
    _, mix = shards
    stream = ShardStream(StreamConfig(mix, shuffle_buffer=8, workers=2))
    batches = _batches(stream, model, 6)
    meta = [b["stream"] for b in batches]
    assert [m["worker"] for m in meta] == [0, 1] * 3  # the workers take turns
    pids = {m["pid"] for m in meta}
    assert len(pids) == 2 and os.getpid() not in pids  # decoded in two other processes
    b = batches[0]
    assert b["pixels"].shape == (3, 3, 20, 20) and b["pixels"].dtype == torch.float32
    assert (b["labels"] != -100).any(dim=1).all()  # every sample has caption tokens to learn
    keys = [m["keys"] for m in meta]
    assert not set(sum(keys[0::2], [])) & set(sum(keys[1::2], []))  # workers: disjoint shards
    # a deterministic function of (seed, rank, start step): the same again...
    again = _batches(stream, model, 6)
    assert [m["keys"] for m in (b["stream"] for b in again)] == keys
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(batches, again))  # crops too
    # ...another rank reads other shards, another start step other draws from the same ones
    rank0, rank1 = (_batches(stream, model, 6, rank=r, world=2) for r in (0, 1))
    assert not ({k for b in rank0 for k in b["stream"]["keys"]}
                & {k for b in rank1 for k in b["stream"]["keys"]})
    assert [b["stream"]["keys"] for b in _batches(stream, model, 6, start_step=1000)] != keys


def _bad_shard(folder, n=4, broken_at=1):
    """A shard whose sample `broken_at` has a caption but a JPEG that is not one."""
    path = folder / "bad-00000.tar"
    good = write_shards(folder / "good", "g", 1, n).replace("{00000..00000}", "00000")
    with tarfile.open(good) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == f"g{broken_at:06d}.jpg":
                data = b"not a jpeg at all"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return str(path)


def test_bad_samples_are_skipped_and_counted_or_named(tmp_path, model):
    shard = _bad_shard(tmp_path)
    stream = ShardStream(StreamConfig(shard, shuffle_buffer=4, workers=1))
    batches = _batches(stream, model, 4)
    seen = {k for b in batches for k in b["stream"]["keys"]}
    assert not any(k.endswith("-g000001") for k in seen) and len(seen) == 3
    assert batches[-1]["stream"]["bad_samples"] > 0 and sum(stream.bad_samples.values()) > 0
    # without skipping: one sentence naming the shard and the sample, raised from the worker
    strict = ShardStream(StreamConfig(shard, shuffle_buffer=4, workers=1, skip_bad=False))
    with pytest.raises(DataError) as err:
        _batches(strict, model, 4)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert "wds-" + shard in message and "g000001" in message and "skip_bad=True" in message


@pytest.mark.parametrize("content,error", [(b"garbage" * 200, "invalid header"),
                                           (b"\x00" * 2048, "none")])  # zeros: an empty tar
def test_unreadable_or_empty_shards_are_skipped_and_a_source_of_only_those_stops(
        tmp_path, model, caplog, content, error):
    good = write_shards(tmp_path, "ok", 1, 3).replace("{00000..00000}", "00000")
    broken = tmp_path / "broken-00000.tar"
    broken.write_bytes(content)
    mix = {"ok": (good, 1), "broken": (str(broken), 1)}
    with pytest.raises(DataError, match=rf"Source 'broken': 20 shards in a row gave no sample "
                                        rf"\(last error: {error}.*\); check its urls\."):
        _batches(ShardStream(StreamConfig(mix, shuffle_buffer=2, workers=0)), model, 50)
    stream = ShardStream(StreamConfig({"ok": (f"{good}::{broken}", 1)}, shuffle_buffer=2,
                                      workers=0))
    assert len(_batches(stream, model, 5)) == 5  # the good shard carries the run


# --- scale: memory and processes ------------------------------------------------------------------
@pytest.mark.slow
def test_memory_stays_flat_over_many_shards(llama_dir, tmp_path):
    """160 shards of 8 LAION-sized images (~80 KB each, 100 MB in all) streamed through training;
    the memory of the process and its 2 workers grows by less than 20 MB between step 10 and the
    end, a fifth of the data: neither the shards nor the samples read are held."""
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("needs Linux's /proc to find the workers and measure their memory")
    pattern = write_shards(tmp_path / "big", "laion", 160, 8, size=256, quality=95)
    total = sum(f.stat().st_size for f in (tmp_path / "big").iterdir()) / 2**20
    assert total >= 5 * 20
    proc = subprocess.run([sys.executable, WORKER, "memory", str(llama_dir), pattern,
                           str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "memory.json").read_text())
    pss = result["pss_mb"]
    assert result["samples"] >= 160 * 8  # as many samples as the data holds went through
    growth = max(pss[10:]) - pss[10]
    assert growth < 20, f"memory grew by {growth:.1f} MB: {pss}"


@pytest.mark.slow
def test_two_processes_read_different_samples_train_one_projection_and_resume(llama_dir, shards,
                                                                               tmp_path):
    folder, _ = shards
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable),
                                                        "torchrun")
    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={port}",
                           "--master_addr=127.0.0.1", WORKER, "ddp", str(llama_dir), str(folder),
                           str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    flat = [set(sum(r["full"], [])) for r in ranks]
    assert flat[0] and not flat[0] & flat[1]  # each process read other samples
    for r in ranks:
        assert len(r["full"]) == 6 and all(len(b) == 3 for b in r["full"])
        assert r["main_pid"] not in r["pids"] and len(r["pids"]) == 1  # decoded in a worker
        assert all(torch.isfinite(torch.tensor(loss)) for loss in r["losses"])
        assert r["replica_diff"] == 0.0 and r["resumed_replica_diff"] == 0.0  # one projection
        assert r["moved"] > 0  # it trained
        # started at 0, 0, then resumed at the checkpoint's step (twice, from copies)
        assert r["starts"] == [[r["rank"], 2, step] for step in (0, 0, 3, 3)]
        assert r["interrupted"] == r["full"][:3]  # the stream from step 0 is the same stream
        assert len(r["resumed"]) == 3  # the resumed run trained the remaining steps, its history
        assert r["resumed_steps"] == [1, 2, 3, 4, 5, 6]  # going on from the checkpoint's
        assert r["resumed"] == r["alone"] == r["again"]  # a function of (seed, rank, step)...
        assert r["resume_twice_diff"] == 0.0  # ...so a resumed run is reproducible
        # fresh draws: neither the run's first batches again nor (by design, see stream.py) the
        # uninterrupted run's continuation, which only re-reading all that was seen could give
        assert r["resumed"] != r["full"][:3] and r["resumed"] != r["full"][3:]
    sources = ranks[0]["sources"] + ranks[1]["sources"]
    assert set(sources) == {"laion", "ccsbu"}
