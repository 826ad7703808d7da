"""Stage 1 at paper scale: image-caption pairs streamed from webdataset shards (paper Sec. 3.1).

The paper's first stage reads about 5 million LAION, Conceptual Captions and SBU pairs, released
as webdataset tar shards of `jpg` + `json{"caption"}`, mixed by sample ratio LAION 115 : CC+SBU 14,
for 20,000 steps of 4 GPUs x 64. Such data is never held in memory. Each reader (one DataLoader
worker of one process) runs, for every source:

    wds.ResampledShards (an endless, seeded draw of shards) -> tar members read one by one
    -> a shuffle buffer of `shuffle_buffer` samples

then a seeded mixer picks the source of each sample by the ratios, and the worker decodes it (JPEG
-> the train transform with random crops, caption cleaned and tokenised) and collates whole
batches. The training process only moves finished batches to the model. Memory is bounded by the
shuffle buffers (sources x workers x buffer x sample size) and the batches made ahead, whatever
the number of shards.

Who reads what: reader k of K (K = processes x workers) draws from its own slice of each source's
shards (every K-th shard) when the source has at least K shards, so processes and workers read
disjoint shards; with fewer shards each reader draws from all of them with its own seeds.

Resuming (ours): the stream a process reads is a deterministic function of (seed, rank, number
of workers, start step): the step a run starts or resumes at seeds its readers. A resumed run is
reproducible and continues with *fresh* samples; it does not replay the batches the interrupted
run had drawn, nor the first batches of the run. An exact replay of the uninterrupted run would
have to re-read everything already seen (the shuffle buffers and the position in every shard) or
store that state; with resampled shards the difference is a few batches drawn from the same
distribution. The official code does not resume the data stream at all.

Mixing (ours): per sample, so each batch is a blend with the expected shares; the official runner
picks one source per *batch* by the same ratios (`MultiIterLoader`): the same expected shares.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from .data import Sample, image_tensor, webdataset_sample
from .errors import ConfigError, DataError
from .model import MiniGPT4
from .prompts import build_example, collate
from .train import TrainConfig

log = logging.getLogger(__name__)

# The official stage-1 sources and ratios (paper Sec. 3.1; sample_ratio 115 and 14)
PAPER_RATIOS = {"laion": 115, "ccsbu": 14}
MAX_EMPTY_SHARDS_IN_A_ROW = 20  # a source whose shards give nothing stops with an error


@dataclass
class StreamConfig:
    """Where stage-1 shards are and how they are streamed.

    `mix` maps a source name to `(shard urls, sample ratio)`, e.g. the official `{"laion":
    ("laion_dataset/{00000..10488}.tar", 115), "ccsbu": ("cc_sbu_dataset/{00000..01255}.tar",
    14)}`; a plain url string (or list) is one source. Urls are anything webdataset opens: brace
    patterns, local paths, `pipe:` commands, http(s), several joined with `::`. The official
    buffer is 1,000 samples, with 4 workers. docs/scale.md shows a whole run.
    """

    mix: dict | str | list
    shuffle_buffer: int = 1000  # samples per source and worker
    workers: int = 4  # DataLoader worker processes per training process (0: decode in-process)
    skip_bad: bool = True  # skip (and count) samples without caption/image or with a bad image
    prefetch: int = 2  # batches each worker prepares ahead
    sources: dict = field(init=False, repr=False)  # name -> (list of urls, ratio)

    def __post_init__(self) -> None:
        mix = self.mix if isinstance(self.mix, dict) else {"shards": (self.mix, 1)}
        self.sources = {}
        for name, value in mix.items():
            pair = isinstance(value, tuple | list) and len(value) == 2 and isinstance(
                value[1], int | float)
            urls, ratio = value if pair else (value, 1)
            urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
            if not urls or not isinstance(ratio, int | float) or not 0 < ratio < math.inf:
                raise ConfigError(f"Invalid StreamConfig: source {name!r} needs shard urls and a "
                                  f"ratio > 0, got {len(urls)} url(s) and ratio {ratio!r}.")
            self.sources[name] = (urls, float(ratio))
        for name, low in (("shuffle_buffer", 1), ("workers", 0), ("prefetch", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ConfigError(f"Invalid StreamConfig: {name} must be a whole number >= {low}, "
                                  f"got {getattr(self, name)!r}.")


def parse_mix(specs: list[str]) -> dict:
    """`["laion=laion/{00000..10488}.tar:115", "ccsbu=cc_sbu/{00000..01255}.tar:14"]` -> a mix.

    Each spec is `NAME=URLS:RATIO` (`:RATIO` may be left out: 1); a spec without `NAME=` is named
    after its position. The ratio is what follows the last colon, so `s3://` urls keep theirs.
    """
    mix = {}
    for i, spec in enumerate(specs):
        name, sep, rest = spec.partition("=")
        if not sep or any(c in name for c in ":/{"):  # no name: the "=" belongs to the url
            name, rest = "", spec
        urls, _, ratio = rest.rpartition(":")
        try:
            ratio_value = float(ratio)
        except ValueError:
            urls, ratio_value = rest, 1.0
        mix[name or f"source{i}"] = (urls, ratio_value)
    return mix


def derive_seed(*parts: int) -> int:
    """A seed from integers (seed, rank, worker, start step, ...): the same on every machine."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# --- what one reader reads ------------------------------------------------------------------------
def _source_samples(name: str, urls: list[str], seed: int, buffer: int) -> Iterator[dict]:
    """One source, endless: resampled shards -> tar members (streamed) -> a shuffle buffer."""
    empty, last_error = 0, "none"  # shards opened since the last sample; the last read error

    def bad_shard(exn: Exception) -> bool:  # unreadable shard data is skipped, with a log
        nonlocal last_error  # webdataset appends the stream and the url to the arguments
        *what, url = exn.args or ("?",)
        last_error = f"{what[0] if what else type(exn).__name__} in {url}"
        log.warning("source %s: skipping unreadable shard data (%s)", name, last_error)
        return True

    def shards() -> Iterator[dict]:  # a source whose shards give nothing stops, not hangs
        nonlocal empty
        for shard in wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0,
                                         deterministic=True):
            if empty >= MAX_EMPTY_SHARDS_IN_A_ROW:
                raise DataError(f"Source {name!r}: {empty} shards in a row gave no sample (last "
                                f"error: {last_error}); check its urls.")
            empty += 1
            yield shard

    def read() -> Iterator[dict]:
        nonlocal empty
        for raw in wds.tarfile_samples(shards(), handler=bad_shard):
            empty = 0
            yield dict(raw, __source__=name)

    return wds.shuffle(buffer, initial=buffer, rng=random.Random(seed))(read())


def mixed_samples(cfg: StreamConfig, seed: int, reader: int = 0,
                  readers: int = 1) -> Iterator[dict]:
    """Raw samples (`__key__`, `__url__`, `__source__`, `jpg`, `json`, ...) of reader `reader`.

    Each source is resampled from this reader's slice of its shards; a seeded draw by the
    ratios picks the source of each sample.
    """
    names = list(cfg.sources)
    streams = []
    for i, name in enumerate(names):
        urls = cfg.sources[name][0]
        own = urls[reader::readers] if len(urls) >= readers else urls
        streams.append(_source_samples(name, own, derive_seed(seed, i), cfg.shuffle_buffer))
    rng, weights = random.Random(derive_seed(seed, -1)), [cfg.sources[n][1] for n in names]
    while True:
        yield next(streams[rng.choices(range(len(names)), weights)[0]])


class _Reader(IterableDataset):
    """The batches one process reads; in each DataLoader worker, that worker's share of them."""

    def __init__(self, cfg: StreamConfig, model: MiniGPT4, tcfg: TrainConfig, rank: int,
                 world: int, start_step: int):
        self.cfg, self.rank, self.world, self.start_step = cfg, rank, world, start_step
        self.tokenizer, self.tcfg = model.tokenizer, tcfg  # not the model: workers need no weights
        self.n_image_tokens = model.cfg.num_visual_tokens
        self.image_size = model.cfg.vision.image_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        seed = derive_seed(self.tcfg.seed, self.rank, worker, self.start_step)
        raw = mixed_samples(self.cfg, seed, self.rank * workers + worker, self.world * workers)
        crops = torch.Generator().manual_seed(derive_seed(seed, -2))
        augment = self.tcfg.augment is not False  # real photos: random crops, as official
        bad = 0
        while True:
            samples, pixels = [], []
            while len(samples) < self.tcfg.batch_size:
                r = next(raw)
                try:
                    s = webdataset_sample(r)
                    pixels.append(image_tensor(s, self.image_size, train=augment,
                                               generator=crops))
                except DataError as e:
                    if not self.cfg.skip_bad:
                        raise DataError(f"{str(e).rstrip('.')}; pass skip_bad=True to skip "
                                        "such samples.") from None
                    bad += 1
                    continue
                samples.append((s, r["__source__"]))
            batch = collate([build_example(self.tokenizer, None, s.answer,
                                           n_image_tokens=self.n_image_tokens,
                                           end_sym=self.tcfg.end_sym,
                                           max_txt_len=self.tcfg.max_txt_len)
                             for s, _ in samples], self.tokenizer.pad_token_id)
            batch["pixels"] = torch.stack(pixels)
            batch["stream"] = {"keys": [s.image_id for s, _ in samples],
                               "sources": [name for _, name in samples],
                               "worker": worker, "pid": os.getpid(), "bad_samples": bad}
            yield batch


class ShardStream:
    """Stage-1 training data streamed from webdataset shards; pass it to `train.train`.

    `train` calls `batches(model, cfg, rank, world, start_step)` instead of indexing a dataset:
    endless batches of `cfg.batch_size` with `pixels` (random crops unless `cfg.augment` is
    False) and `stream` (the samples' keys and sources, the worker, the bad samples skipped).
    The frozen-feature cache is off for a stream (unbounded data, random crops).
    """

    def __init__(self, cfg: StreamConfig):
        self.cfg = cfg
        for name, (urls, _) in cfg.sources.items():  # local shards: a missing file fails now
            missing = [u for u in urls if "://" not in u and not u.startswith("pipe:")
                       and not os.path.isfile(u)]
            if missing:
                raise DataError(f"Source {name!r}: {len(missing)} of {len(urls)} shard file(s) "
                                f"do not exist, e.g. {missing[0]}.")
        self.bad_samples: dict[int, int] = {}  # by worker, as the workers last reported

    def batches(self, model: MiniGPT4, cfg: TrainConfig, rank: int = 0, world: int = 1,
                start_step: int = 0) -> Iterator[dict]:
        """Endless batches for process `rank` of `world`, seeded by (cfg.seed, rank, start_step)."""
        if cfg.stage != 1:
            raise ConfigError("A ShardStream holds stage-1 image-caption pairs; train stage 2 on "
                              "the curated pairs (cc_sbu_align).")
        reader = _Reader(self.cfg, model, cfg, rank, world, start_step)
        workers = self.cfg.workers
        loader = DataLoader(reader, batch_size=None, num_workers=workers,
                            prefetch_factor=self.cfg.prefetch if workers else None,
                            pin_memory=model.device.type == "cuda")
        try:
            for batch in loader:
                self.bad_samples[batch["stream"]["worker"]] = batch["stream"]["bad_samples"]
                yield batch
        except DataError as e:  # raised in a worker: its one sentence, not the worker's traceback
            e.__traceback__ = None  # no reference cycle: the workers stop now, not at a later gc
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ")[-1]) from None
        finally:
            if sum(self.bad_samples.values()):
                log.warning("stream: skipped %d bad samples", sum(self.bad_samples.values()))

    def samples(self, seed: int = 42, rank: int = 0, world: int = 1,
                start_step: int = 0) -> Iterator[Sample]:
        """The samples (undecoded) process `rank` reads with one worker (or none): for a look."""
        raw = mixed_samples(self.cfg, derive_seed(seed, rank, 0, start_step), rank, world)
        for r in raw:
            yield webdataset_sample(r)
