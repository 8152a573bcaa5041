"""Where a run's figures go beside logs/*.jsonl (`run.report_to`): TensorBoard (OUT/tensorboard) and Weights &
Biases (`pip install 'olaf[wandb]'`, imported only when asked). A reporter that cannot start (the package missing,
no login, no network in online mode) is one line at start-up and the run goes on without it; one that fails later
is one line and is dropped, never a crash mid-run. The logs/*.jsonl files always hold every figure.

W&B: project `run.wandb_project`, run name the output folder's, the run's config and its stores' identities as
the W&B config; a resumed run continues the same W&B run (its id is kept in OUT/wandb-run-id). `WANDB_MODE=offline`
writes the run under OUT/wandb for `wandb sync`.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

REPORTERS = ("tensorboard", "wandb")


class TensorBoard:
    name = "tensorboard"

    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(out / "tensorboard")

    def scalars(self, figures: dict, step: int) -> None:
        for k, v in figures.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    name = "wandb"

    def __init__(self, out: Path, project: str, config: dict):
        import wandb

        id_file = out / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        self.run = wandb.init(project=project, name=out.resolve().name, id=run_id, resume="allow", dir=str(out),
                              config=config, settings=wandb.Settings(console="off", silent=True))
        id_file.write_text(run_id + "\n")

    def scalars(self, figures: dict, step: int) -> None:
        self.run.log(figures, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # its process-wide state goes too: a later run in this process starts from the environment


def open_reporters(names: list[str], out: Path, project: str, config: dict, log) -> list:
    """The reporters of `names` that start; each that does not is one line (why, and that the run goes on)."""
    out_list = []
    for name in names:
        try:
            out_list.append(TensorBoard(out) if name == "tensorboard" else WandB(out, project, config))
        except ImportError as e:
            extra = "pip install 'olaf[wandb]'" if name == "wandb" else "pip install tensorboard"
            log(f"note: {name} is not installed ({e.name}): no {name} logs for this run ({extra}); logs/*.jsonl "
                f"have every figure")
        except Exception as e:  # noqa: BLE001  (a login or network failure must not stop a run that can train)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            log(f"note: {name} could not start ({type(e).__name__}: {first}): no {name} logs for this run; "
                f"logs/*.jsonl have every figure")
    return out_list


def report(reporters: list, figures: dict, step: int) -> None:
    """`figures` at `step` to every reporter; one that fails is said once and dropped."""
    for r in list(reporters):
        try:
            r.scalars(figures, step)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {r.name} failed at step {step} ({type(e).__name__}: {str(e)[:200]}): no more {r.name} "
                  f"logs for this run; logs/*.jsonl go on", file=sys.stderr)
            reporters.remove(r)


def close(reporters: list) -> None:
    for r in reporters:
        try:
            r.close()
        except Exception as e:  # noqa: BLE001
            print(f"warning: closing {r.name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
