"""`python -m hae_fx`: the `hae-fx` command line (`hae_fx.cli`)."""

import sys

from hae_fx.cli import main

sys.exit(main())
