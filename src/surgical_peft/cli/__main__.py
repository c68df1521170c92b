"""`python -m surgical_peft.cli ...` (and `accelerate launch -m surgical_peft.cli train ...`)."""

import sys

from .main import main

sys.exit(main())
