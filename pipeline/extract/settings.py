"""The job's settings (what the command line gives, `pipeline.extract.cli`), the error that means "fix your
input" (exit status 2), and SIGTERM taken as Ctrl-C (what SLURM and Kubernetes send on preemption)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.inputs import IMAGE_KEYS
from recipes.imageops import DEFAULT_MAX_PIXELS
from recipes.manifest import DEFAULT_MANIFEST


class UsageError(Exception):
    """Bad arguments or an output that cannot be used; exit status 2."""


@dataclass
class Settings:
    data_path: str
    image_folder: str | None
    output: str
    teachers_manifest: str = str(DEFAULT_MANIFEST)
    fidelity: str | None = None
    tasks: list[str] | None = None  # None: every teacher of the manifest (run() resolves it once it is loaded)
    shard_size: int = 256
    limit: int | None = None
    formats: list[str] = field(default_factory=lambda: ["zarr", "wds"])
    encoding: str | None = None
    zarr_compression: str = "none"
    batch_size: int | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    torch_threads: int | None = None
    decode_cpus: float = 1.0
    prefetch: int | None = None
    max_writers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_on: str = "auto"
    address: str | None = None
    num_cpus: int | None = None
    trust_done: bool = False
    shard_retries: int = 2
    plan_only: bool = False
    progress: bool = True
    image_keys: tuple[str, ...] = IMAGE_KEYS  # WebDataset input: the image member suffixes, in preference order
    caption_key: str = "txt"  # WebDataset input: the caption member (txt), or a json member's field (json:caption)
    id_prefix: str = "none"  # WebDataset input: a sample's id is its key (none) or its tar's path / its key (tar)
    image_column: str | None = None  # parquet input: the columns (None: found by name, pipeline.parquet)
    caption_column: str | None = None
    id_column: str | None = None

    def task_list(self) -> list[str]:
        """The tasks asked, in the canonical order: --tasks, or (None) every teacher of the manifest."""
        from recipes.manifest import load_manifest, ordered_tasks

        if self.tasks is None:
            return list(load_manifest(self.teachers_manifest, fidelity=self.fidelity).teachers)
        return ordered_tasks(self.tasks)

    @property
    def store_shape(self) -> StoreShape:
        return StoreShape(self.output, tuple(self.task_list()), self.shard_size, tuple(self.formats), self.encoding,
                          self.zarr_compression)

    @property
    def cluster_ask(self) -> ClusterAsk:
        return ClusterAsk(tuple(self.task_list()), self.actors, self.gpus_per_actor, self.cpus_per_actor, self.decode_cpus,
                          self.dtype, self.torch_threads, self.batch_size, self.prefetch, self.max_writers,
                          self.resize_on)


@dataclass(frozen=True)
class StoreShape:
    """The store this run writes or continues: where, the run's tasks, and the layout a resume must match."""

    output: str
    tasks: tuple[str, ...]
    shard_size: int
    formats: tuple[str, ...]
    encoding: str | None
    zarr_compression: str


@dataclass(frozen=True)
class ClusterAsk:
    """How the run asks to divide the cluster (resources.plan_resources makes it the run's Resources)."""

    tasks: tuple[str, ...]
    actors: int | None
    gpus_per_actor: float | None
    cpus_per_actor: float
    decode_cpus: float
    dtype: str
    torch_threads: int | None
    batch_size: int | None
    prefetch: int | None
    max_writers: int | None
    resize_on: str


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send on preemption): stop as on Ctrl-C."""


SIGNALS_RECEIVED: list[str] = []  # what stopped the job, whatever exception reached main (libraries re-raise)


def on_sigterm(signum, frame):
    SIGNALS_RECEIVED.append("SIGTERM")
    raise Terminated()
