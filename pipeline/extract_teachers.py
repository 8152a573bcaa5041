"""`python -m pipeline.extract_teachers`: the extraction job (pipeline/extract/; `--help` says everything)."""

import sys

from pipeline.extract.cli import main

if __name__ == "__main__":
    sys.exit(main())
