"""The authors' pinned environment (env.py) and what runs inside it (load_export.py)."""
