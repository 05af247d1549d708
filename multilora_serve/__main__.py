"""``python -m multilora_serve``: the same as the ``multilora-serve`` console script."""
import sys

from multilora_serve.launcher import main

sys.exit(main())
