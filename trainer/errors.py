"""The trainer's one error a user can fix: every command prints its message as one line (exit status 2)."""


class TrainerError(Exception):
    """Something the user can fix; the message says what (exit status 2)."""
