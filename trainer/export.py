"""Exports of a PT run, for the next stage (each folder format is a module of trainer/formats/, which writes and
reads it):

    RUN/export/  (written by trainer.pt at its end; trainer.formats.run_export)
    python -m trainer.export RUN_DIR --format ola-vlm --out DIR     # a PT model folder OLA-VLM's IFT loads
    python -m trainer.export RUN_DIR --format llava --out DIR       # RUN/export/ (mm_projector.bin, tokens, heads)
    python -m trainer.export RUN_DIR --format vlora --out DIR       # a VLoRA run: their PT output folder

An export is made from one checkpoint (the run's latest, or --checkpoint), written whole or not at all, never
into a folder that is not empty, the run itself or a store. `ola-vlm` is written for the authors' pinned
transformers 4.41.1 (trainer/formats/ola_vlm.py says what that takes); tests/test_authors_env.py loads it there.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from trainer.errors import USER_ERRORS
from trainer.formats.common import check_out, write_export
from trainer.formats.ola_vlm import AuthorsWarning, export_ola_vlm
from trainer.formats.run_export import export_llava
from trainer.formats.vlora_pt import export_vlora

WRITERS = {"ola-vlm": export_ola_vlm, "llava": export_llava, "vlora": export_vlora}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a trainer.pt --output-dir (finished or not)")
    p.add_argument("--format", choices=["ola-vlm", "llava", "vlora"], required=True,
                   help="ola-vlm: the folder OLA-VLM's IFT continues from; llava: RUN/export (mm_projector.bin, task "
                        "tokens, heads); vlora: VLoRA's PT output (mm_projector.bin + config.json) for a VLoRA run")
    p.add_argument("--out", required=True, help="a new (or empty) folder outside the run")
    p.add_argument("--checkpoint", help="a checkpoints/step-N folder (default: the run's latest)")
    a = p.parse_args(argv)
    run, out = Path(a.run_dir), Path(a.out)
    try:
        check_out(out, run)
        write = WRITERS[a.format]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AuthorsWarning)
            path = write_export(write, run, out, Path(a.checkpoint) if a.checkpoint else None)
        for w in caught:
            if issubclass(w.category, AuthorsWarning):
                print(f"warning: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except (*USER_ERRORS, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
