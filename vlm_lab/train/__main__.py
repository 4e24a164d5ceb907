"""`python -m vlm_lab.train CONFIG [--set key=value ...]` (also under `torchrun ... -m vlm_lab.train`); see
`vlm_lab.train.run`."""

from vlm_lab.train.run import main

raise SystemExit(main())
