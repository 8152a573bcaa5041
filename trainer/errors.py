"""The trainer's errors a user can fix: `TrainerError` and its kinds (checkpoint.CheckpointError, vlora.VLoRAError,
formats.common.ExportError), and the layers' below it (the store's StoreError, a teacher manifest's ManifestError):
`USER_ERRORS`, what every trainer command prints as one line (exit status 2)."""

from recipes.manifest import ManifestError
from store import StoreError


class TrainerError(Exception):
    """Something the user can fix; the message says what (exit status 2)."""


USER_ERRORS = (TrainerError, StoreError, ManifestError)
