"""``python -m fastjukebox`` (and ``accelerate launch -m fastjukebox``): the command line."""
import sys

from .cli import main

sys.exit(main())
