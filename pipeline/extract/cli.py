"""Run the OLA-VLM teachers once over a LLaVA dataset and write a store (Zarr + WebDataset + manifests).

    ray job submit --address http://127.0.0.1:8265 --working-dir "$(python -m pipeline.jobdir build/job)" -- \\
      python -m pipeline.extract_teachers --data-path /data/blip_laion_cc_sbu_558k.json \\
        --image-folder /data/images --output /stores/ola558k [--tasks gen,depth,seg] [--shard-size 256]
    python -m pipeline.extract_teachers ...      # the same, on a local Ray it starts (127.0.0.1) and stops

Re-running the same command resumes: done shards are verified by their checksums and skipped, partial ones are
redone, and the data files come out byte-identical to an uninterrupted run's. `--tasks seg` on an existing
store computes only seg. Exit status: 0 when every shard is done, 1 when some shard kept failing (listed; the
rest is finished), 2 for unusable input (reported before any model is loaded where possible), 130 / 143 when
stopped by Ctrl-C / SIGTERM (committed shards are kept; re-run to resume).

How it runs (pipeline/extract/, one module per stage):
  plan        validate the JSON, fixed shards of --shard-size samples in dataset order
  preflight   everything that needs no model: the output, the store to continue, the weights' configs
  resources   actors, GPUs, CPUs, batch size, queues, where the recipes run, from the cluster
  actors      decode tasks (CPU: read, decode, and with --resize-on cpu every recipe's PIL ops), one teacher actor
              per GPU (normalise, forward, encode; with --resize-on device the recipes too, bit-identically),
              writer tasks (join a shard's batches on sample ids, write its data)
  scheduler   shard after shard in dataset order: leases, bounded queues, retries, commits (the driver only)
  report      progress in the manifest, the summary
The unit of commit, resume, verification and retry is the shard. Ray Data's map_batches would give the
decode/teacher overlap too, but it reorders and re-blocks data, has no per-shard commit hook, and regrouping its
output into contiguous shards means a shuffle of 1.65 TB of features. An actor pool fed shard by shard keeps
order and exactly-once commits simple, bounds memory explicitly (--prefetch decoded batches per actor,
--max-writers shards awaiting their commit), and Ray supplies fault tolerance: a decode or writer worker killed
mid-shard is retried, an actor killed is restarted and its in-flight batch re-run; a shard whose commit still
fails is retried --shard-retries times, then reported.
"""

from __future__ import annotations

import argparse
import signal
import sys

import store
from pipeline.extract.run import run
from pipeline.extract.settings import SIGNALS_RECEIVED, Settings, Terminated, UsageError, on_sigterm
from pipeline.inputs import ID_PREFIXES, IMAGE_KEYS, DatasetError
from recipes.imageops import DEFAULT_MAX_PIXELS
from recipes.manifest import DEFAULT_MANIFEST, TASKS, ManifestError
from teachers.weights import WeightsNotFound


def _input_args(a) -> None:
    """The input's options: what --data-path names, and how each kind's images, captions and ids are found."""
    a("--data-path", required=True, help="the input: a LLaVA JSON (blip_laion_cc_sbu_558k.json), a JSONL listing "
                                         "(a record per line), WebDataset tars, local or s3:// "
                                         "('in/{00000..02999}.tar', img2dataset's output), or parquet files "
                                         "('in/*.parquet': img2dataset's parquet output, HF datasets' exports)")
    a("--image-folder", default=None, help="folder the records' image paths are relative to (JSON, JSONL, and "
                                           "parquet whose images are paths)")
    a("--image-keys", default=",".join(IMAGE_KEYS), help="WebDataset input: image member suffixes, in preference "
                                                        f"order (default {','.join(IMAGE_KEYS)})")
    a("--caption-key", default="txt", help="WebDataset input: the caption member's suffix (default txt), or "
                                          "json:FIELD for a field of the json member")
    a("--id-prefix", choices=ID_PREFIXES, default="none",
      help="WebDataset input: a sample's id is its key (none, default) or its tar's path relative to the pattern's "
           "root, then its key (tar: '{cc,laion}/00000.tar' gives cc/00000/000000001), for datasets whose keys "
           "repeat; ids must be unique, duplicates are refused")
    a("--image-column", help="parquet input: the image column, bytes (img2dataset's jpg), an HF Image struct or a "
                             "path under --image-folder (default: the first of jpg, image, png, webp, jpeg, img)")
    a("--caption-column", help="parquet input: the caption column (default: the first of caption, txt, text)")
    a("--id-column", help="parquet input: the id column (default: key or id; without one, <file stem>/<row>)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.extract_teachers", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    _input_args(a)
    a("--output", required=True, help="store directory or URL (created, or resumed if it is one)")
    a("--teachers-manifest", default=str(DEFAULT_MANIFEST), help="teacher manifest YAML (default: ola_vlm.yaml)")
    a("--fidelity", choices=["original", "corrected"], default=None,
      help="original recipe with its quirks (default) or corrected (e.g. RGB for depth)")
    a("--tasks", default=None, help=f"comma list of the manifest's teachers (default: all of them; OLA-VLM's are "
                                    f"{','.join(TASKS)}), or `none`: a store of images, captions and ids only "
                                    f"(VLoRA's PT and the NTP-only baseline read no target); teachers join it later "
                                    f"with --tasks on the same --output, a new one (e.g. dino) as the three do")
    a("--shard-size", type=int, default=256, help="samples per shard (default 256, ~0.76 GB fp16)")
    a("--limit", type=int, default=None, help="only the first N records (smoke runs)")
    a("--formats", default="zarr,wds", help="comma list of zarr,wds (default both)")
    a("--encoding", choices=list(store.encodings.ENCODINGS), default=None,
      help="stored encoding: fp16 or bf16 (lossless; default: the manifest's stored_dtype) or fp8 (half the bytes, "
           "~2%% relative error)")
    a("--zarr-compression", choices=list(store.COMPRESSIONS), default="none",
      help="zstd on Zarr chunks (fp16 features compress ~1.09x; default none)")
    a("--batch-size", type=int, default=None, help="images per teacher forward (default 64 GPU, 8 CPU)")
    a("--actors", type=int, default=None, help="teacher actors (default: GPUs / --gpus-per-actor, or 1)")
    a("--gpus-per-actor", type=float, default=None, help="GPUs per actor (default 1 with GPUs, else 0)")
    a("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per actor (default 1)")
    a("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
      help="teacher compute dtype for all teachers (default auto: each teacher's compute_dtype from the manifest on "
           "GPU, as the original ran them: gen float16, depth and seg bfloat16; float32 on CPU)")
    a("--torch-threads", type=int, default=None, help="torch threads per actor (default: its CPUs)")
    a("--decode-cpus", type=float, default=1.0, help="CPUs per decode task (default 1)")
    a("--prefetch", type=int, default=None,
      help="decoded batches queued per actor (default: enough to keep every CPU decoding, >= 2)")
    a("--max-writers", type=int, default=None, help="shards awaiting commit at once (default 2x actors+1)")
    a("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
      help=f"refuse images over this many pixels before decoding (default {DEFAULT_MAX_PIXELS})")
    a("--resize-on", choices=["auto", "cpu", "device"], default="auto",
      help="where the recipes' resizes run: cpu (PIL in the decode workers) or device (the teachers' GPU, "
           "bit-identical to PIL, checked against this Pillow when the actors start; ~4x fewer bytes through Ray "
           "and most of the CPU work gone). Default auto: device on GPUs, else cpu")
    a("--address", default=None,
      help="Ray cluster to join (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)")
    a("--num-cpus", type=int, default=None, help="CPUs of the local Ray this job starts (default: all)")
    a("--trust-done", action="store_true",
      help="skip done shards after a size check instead of re-hashing them (fast resume)")
    a("--shard-retries", type=int, default=2, help="resubmissions of a shard that fails (default 2)")
    a("--plan-only", action="store_true", help="validate and print the plan, then exit")
    a("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def parse_args(argv=None) -> Settings:
    p = _parser()
    a = p.parse_args(argv)
    tasks = None if a.tasks is None else [t.strip() for t in a.tasks.split(",") if t.strip()]
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    tasks = [] if tasks == ["none"] else tasks
    bad = [problem for t in tasks or [] if (problem := store.layout.task_name_problem(t))]
    if bad or (tasks == [] and a.tasks.strip() != "none"):
        p.error(f"--tasks: {bad[0] if bad else f'no task in {a.tasks!r}'}; give the manifest's teachers (e.g. "
                f"{','.join(TASKS)}), or none")
    if [f for f in formats if f not in store.FORMATS] or not formats:
        p.error(f"--formats: choose from {','.join(store.FORMATS)}")
    for name in ("batch_size", "actors", "prefetch", "max_writers"):  # --shard-size and --limit: the input's (plan)
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    values = {k: v for k, v in vars(a).items() if k not in ("tasks", "formats", "no_progress", "image_keys")}
    keys = tuple(k.strip().lower() for k in a.image_keys.split(",") if k.strip())
    if not keys:
        p.error("--image-keys: give at least one member suffix (e.g. jpg,png,webp)")
    return Settings(**values, tasks=tasks, formats=formats, progress=not a.no_progress,
                    image_keys=keys)


def main(argv=None) -> int:
    s = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return run(s)
    except (DatasetError, ManifestError, store.StoreError, UsageError, WeightsNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        sigterm = isinstance(e, Terminated) or "SIGTERM" in SIGNALS_RECEIVED
        name, code = ("SIGTERM", 143) if sigterm else ("interrupted", 130)
        print(f"\n{name}: stopped; committed shards are safe; re-run the same command to resume", file=sys.stderr)
        return code
