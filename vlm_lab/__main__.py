"""`python -m vlm_lab ...` is the same as the `vlm-lab ...` console script (see `vlm_lab.cli`)."""

from vlm_lab.cli import main

raise SystemExit(main())
